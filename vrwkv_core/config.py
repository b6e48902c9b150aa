"""The recipe schema: dataclasses with a docstring per field, loaded through OmegaConf.

Precedence: schema defaults < the YAML recipe < `key=value` overrides. OmegaConf's struct
mode rejects unknown keys; every error names the key and the file. `load_recipe` is the
one entry point; `recipe_to_yaml` gives the resolved recipe back as pure YAML.

    recipe = load_recipe("recipes/tiny.yaml", ["pretrain.max_steps=10"])
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from vrwkv_core.errors import RecipeError

RWKV_VERSIONS = ("x070", "x060")  # the LM families (vrwkv_core.model.families.FAMILIES)
WKV_BACKENDS = ("auto", "reference", "chunked", "cuda", "fla")  # vrwkv_core.kernels.BACKENDS

@dataclass
class RWKVSection:
    """The RWKV language model."""

    checkpoint: Optional[str] = None
    """RWKV World .pth to start from (a path or `hub:NAME`); null builds a random model."""
    version: str = "x070"
    """Architecture: `x070` (RWKV-7) or `x060` (RWKV-6)."""
    n_layer: int = 12
    """Number of blocks."""
    n_embd: int = 768
    """Model width C."""
    head_size: int = 64
    """Size N of each WKV head (C / N heads)."""
    vocab_size: int = 65536
    """Vocabulary size (the World tokenizer has 65536 ids)."""
    dim_ffn: Optional[int] = None
    """Channel-mix width; null means 4 * n_embd (x070) or int(3.5*C // 32 * 32) (x060)."""
    wkv_backend: str = "auto"
    """WKV kernel: auto (the CUDA kernel on a GPU when it builds, else chunked), chunked, cuda, or
    reference (the slow sequential loop, for checks). `--wkv-backend` on chat/eval/bench sets it too."""


@dataclass
class TinyTowerSection:
    """The `tiny` vision tower: a small randomly initialised timm ViT for tests and CPU."""

    width: int = 64
    """Embedding width."""
    depth: int = 2
    """Number of transformer blocks."""
    heads: int = 2
    """Attention heads."""
    patch_size: int = 8
    """Patch size in pixels."""


@dataclass
class TowerFilesSection:
    """Tower weight files (a path or `hub:NAME`), used when building from an RWKV World .pth."""

    dino: Optional[str] = None
    """DINOv2-L/14 reg4 weights (timm safetensors)."""
    siglip: Optional[str] = None
    """SigLIP SO400M/14 weights (timm safetensors or the open_clip file)."""
    sam: Optional[str] = None
    """SAM ViT-B image encoder weights (timm safetensors or Meta's .pth)."""
    clip: Optional[str] = None
    """CLIP ViT-L/14-336 weights (v6.0)."""


@dataclass
class VisionSection:
    """The vision towers."""

    towers: list[str] = field(default_factory=lambda: ["dino", "siglip", "sam"])
    """Towers in concatenation order: dino, siglip, sam (v7.00), clip (v6.0), or tiny."""
    image_size: int = 448
    """Square input size of the DINOv2/SigLIP/tiny towers (SAM always takes 1024)."""
    freeze: bool = True
    """Keep towers frozen (no grads, eval mode). Set false to train them."""
    tiling: bool = False
    """Split large images into a best-fit grid of tiles plus the global view."""
    checkpoints: TowerFilesSection = field(default_factory=TowerFilesSection)
    """Tower weight files, used when building a new model from an RWKV World .pth."""
    tiny: TinyTowerSection = field(default_factory=TinyTowerSection)
    """Shape of the `tiny` tower."""


@dataclass
class ProjectorSection:
    """The projector from tower features to the LM width."""

    type: str = "mlp"
    """`mlp` (gated: LayerNorm(o_proj(x * sigmoid(gate(x))))) or `linear`."""


@dataclass
class ModelSection:
    """The whole VisualRWKV model."""

    rwkv: RWKVSection = field(default_factory=RWKVSection)
    """The language model."""
    vision: VisionSection = field(default_factory=VisionSection)
    """The vision towers."""
    projector: ProjectorSection = field(default_factory=ProjectorSection)
    """The projector."""
    tokens_per_image: int = 1024
    """Image tokens per image after adaptive pooling (a square number)."""
    image_position: str = "first"
    """Where the image goes in the human turn: `first` (v7.00) or `middle` (v6.0 finetune)."""


@dataclass
class DataSection:
    """Training data (LLaVA-style JSONL written by `vrwkv prepare-data`)."""

    root: str = "data/shapes"
    """Folder the other data paths are relative to."""
    pretrain_file: str = "pretrain.jsonl"
    """Stage-1 records."""
    finetune_file: str = "finetune.jsonl"
    """Stage-2 records."""
    image_folder: str = "images"
    """Folder image paths in the records are relative to (kept inside it)."""
    ctx_len: int = 2048
    """Longest training sample in tokens; longer ones are truncated keeping whole images."""
    val_fraction: float = 0.02
    """Held-out fraction of the records for validation loss."""
    skip_bad_images: bool = False
    """Drop samples whose image fails to load (counted and logged) instead of stopping."""
    num_workers: int = 0
    """DataLoader worker processes."""
    synthetic: bool = False
    """Prepare the synthetic shapes data in `root` when it is missing."""


@dataclass
class StageSection:
    """One training stage (pretrain or finetune)."""

    out_dir: str = "out/model/stage"
    """Where config.yaml, model.safetensors, last.ckpt, metrics.csv, loss.png go."""
    init_from: Optional[str] = None
    """A previous stage's out_dir (or a released .pth) to start from."""
    trainable: list[str] = field(default_factory=lambda: ["projector"])
    """Parts that train: projector, rwkv, rwkv.emb, rwkv.head, vision."""
    frozen: list[str] = field(default_factory=list)
    """Parts kept frozen inside trainable ones (released finetune: [rwkv.emb])."""
    lr_init: float = 1e-3
    """Peak learning rate after warmup."""
    lr_final: float = 1e-5
    """Learning rate at the end of the cosine schedule."""
    warmup_steps: int = 0
    """Linear warmup in optimizer steps."""
    max_steps: int = 1000
    """Optimizer steps in this stage."""
    micro_batch: int = 1
    """Samples per device per forward; lower it if you run out of memory."""
    grad_accum: int = 1
    """Micro batches per optimizer step."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    logit_l2: float = 0.0
    """Coefficient of the L2 penalty on the max logit (RWKV training's regulariser)."""
    save_every_steps: int = 500
    """Write last.ckpt every this many steps (and at the end)."""
    val_every_steps: int = 500
    """Validation loss every this many steps (0 disables)."""
    seed: int = 42
    """Seed for init, data order and dropout."""
    image_position: Optional[str] = None
    """Image placement in this stage's training samples; null uses model.image_position (v6.0 stage 1: `first`)."""
    max_bad_steps: int = 10
    """Stop after this many steps in a row with a non-finite loss or gradients (each is skipped, not applied)."""


@dataclass
class HardwareSection:
    """Where and how to run."""

    accelerator: str = "auto"
    """auto, cpu or gpu."""
    devices: int = 1
    """Devices per node."""
    nodes: int = 1
    """Number of nodes."""
    precision: str = "bf16"
    """bf16 or fp32."""
    strategy: str = "auto"
    """auto, ddp, deepspeed_stage_1, deepspeed_stage_2, deepspeed_stage_3."""
    cpu_offload: bool = False
    """DeepSpeed: offload optimizer states to CPU."""
    grad_checkpoint: bool = False
    """Recompute block activations in backward to save memory."""
    ds_bucket_mb: int = 200
    """DeepSpeed reduce/allgather bucket size in MB."""
    deterministic: bool = False
    """Deterministic algorithms for bit-exact reruns and resumes on GPU (slower); CPU runs are deterministic already."""


@dataclass
class LoggingSection:
    """Training logs."""

    csv: bool = True
    """metrics.csv in out_dir."""
    tensorboard: bool = False
    """TensorBoard logs in out_dir/tb."""
    wandb: Optional[str] = None
    """W&B project name (null disables)."""


@dataclass
class Recipe:
    """A whole recipe: the model, the data, both stages and the hardware."""

    name: str = "model"
    """Name used in output folders and model ids."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model."""
    data: DataSection = field(default_factory=DataSection)
    """The data."""
    pretrain: StageSection = field(default_factory=StageSection)
    """Stage 1: projector only (released setup)."""
    finetune: StageSection = field(
        default_factory=lambda: StageSection(
            trainable=["projector", "rwkv"], frozen=["rwkv.emb"], lr_init=6e-5, lr_final=1.5e-5
        )
    )
    """Stage 2: projector and LM (released setup)."""
    hardware: HardwareSection = field(default_factory=HardwareSection)
    """Hardware."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Logging."""


_CHOICES = {
    "model.rwkv.version": RWKV_VERSIONS,
    "model.rwkv.wkv_backend": WKV_BACKENDS,
    "model.projector.type": ("mlp", "linear"),
    "model.image_position": ("first", "middle"),
    "hardware.accelerator": ("auto", "cpu", "gpu", "cuda"),
    "hardware.precision": ("bf16", "fp32"),
    "hardware.strategy": ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"),
}
_TOWERS = ("dino", "siglip", "sam", "clip", "tiny")
_TRAINABLE = ("projector", "rwkv", "rwkv.emb", "rwkv.head", "vision")


def _validate(recipe: Recipe, source: str) -> None:
    """Checks values the type system cannot: choices, ranges, shapes."""

    def bad(key: str, msg: str) -> RecipeError:
        return RecipeError(f"{source}: {key}: {msg}")

    for key, choices in _CHOICES.items():
        value = _get(recipe, key)
        if value not in choices:
            raise bad(key, f"{value!r} is not one of {', '.join(choices)}")
    rw = recipe.model.rwkv
    if rw.n_embd % rw.head_size:
        raise bad("model.rwkv.n_embd", f"{rw.n_embd} is not a multiple of head_size {rw.head_size}")
    for key in ("model.rwkv.n_layer", "model.rwkv.n_embd", "model.rwkv.head_size", "model.tokens_per_image"):
        if _get(recipe, key) <= 0:
            raise bad(key, "must be positive")
    side = round(recipe.model.tokens_per_image**0.5)
    if "clip" in recipe.model.vision.towers:
        # CLIP (v6.0) is not pooled: its 24x24 patch rows plus the CLS row.
        if recipe.model.tokens_per_image != 577:
            raise bad("model.tokens_per_image", "the clip tower gives 577 tokens (576 patches + CLS)")
    elif side * side != recipe.model.tokens_per_image:
        raise bad("model.tokens_per_image", f"{recipe.model.tokens_per_image} is not a square number")
    for tower in recipe.model.vision.towers:
        if tower not in _TOWERS:
            raise bad("model.vision.towers", f"unknown tower {tower!r}; choose from {', '.join(_TOWERS)}")
    if not recipe.model.vision.towers:
        raise bad("model.vision.towers", "needs at least one tower")
    for stage in ("pretrain", "finetune"):
        st: StageSection = getattr(recipe, stage)
        for key in ("trainable", "frozen"):
            for part in getattr(st, key):
                if part not in _TRAINABLE:
                    raise bad(f"{stage}.{key}", f"unknown part {part!r}; choose from {', '.join(_TRAINABLE)}")
        if st.image_position is not None and st.image_position not in _CHOICES["model.image_position"]:
            choices = ", ".join(_CHOICES["model.image_position"])
            raise bad(f"{stage}.image_position", f"{st.image_position!r} is not one of {choices} (or null)")
        for key in ("max_steps", "micro_batch", "grad_accum", "max_bad_steps"):
            if getattr(st, key) <= 0:
                raise bad(f"{stage}.{key}", "must be positive")
    if not 0.0 <= recipe.data.val_fraction < 1.0:
        raise bad("data.val_fraction", "must be in [0, 1)")
    if recipe.hardware.devices <= 0 or recipe.hardware.nodes <= 0:
        raise bad("hardware.devices", "devices and nodes must be positive")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _known_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (for "did you mean")."""
    obj = Recipe() if obj is None else obj
    keys = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        keys.append(prefix + f.name)
        if is_dataclass(value):
            keys.extend(_known_keys(value, prefix + f.name + "."))
    return keys


def _friendly(err: Exception, source: str) -> RecipeError:
    """Turns an OmegaConf error into one line naming the key and the file."""
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError) or "not in struct" in msg or "Key '" in msg and "not" in msg:
        close = difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "see the recipe reference in README.md"
        return RecipeError(f"{source}: unknown key '{key}'", hint=hint)
    if isinstance(err, OmegaConfBaseException) and "Missing mandatory value" in msg:
        return RecipeError(f"{source}: missing required value '{key}'")
    if key:
        return RecipeError(f"{source}: {key}: {msg}")
    return RecipeError(f"{source}: {msg}")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Loads a recipe: schema defaults < YAML file < `key=value` overrides, then validates."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(Recipe)
    OmegaConf.set_struct(base, True)
    source = str(path) if path is not None else "<defaults>"
    layers = [base]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"{source}: recipe file not found", hint="pass a path such as recipes/tiny.yaml")
        text = p.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise RecipeError(f"{source}: malformed YAML{where}: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
        try:
            layers.append(OmegaConf.create(data))
        except OmegaConfBaseException as err:
            raise _friendly(err, source) from None
    for item in overrides or []:
        if item.startswith("-"):
            raise RecipeError(f"unknown option '{item}'", hint="recipe values are set as key=value, e.g. pretrain.max_steps=10")
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not key=value", hint="e.g. pretrain.micro_batch=16")
    try:
        merged = OmegaConf.merge(*layers)
        if overrides:
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
            except OmegaConfBaseException as err:
                raise _friendly(err, "override") from None
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _friendly(err, source) from None
    _validate(recipe, source)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (what config.yaml holds)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)  # type: ignore[return-value]


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as pure YAML (for --print-config and config.yaml)."""
    import yaml

    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def recipe_from_dict(data: dict[str, Any], source: str = "<config>") -> Recipe:
    """Rebuilds a Recipe from plain data (a saved config.yaml), validated like a file."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(Recipe)
    OmegaConf.set_struct(base, True)
    try:
        recipe: Recipe = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.create(data)))  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _friendly(err, source) from None
    _validate(recipe, source)
    return recipe


def schema_reference() -> str:
    """Markdown reference of every recipe key (type, default, docstring), for the README."""
    import ast
    import inspect

    def docs(cls: type) -> dict[str, str]:
        tree = ast.parse(inspect.getsource(cls))
        out: dict[str, str] = {}
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                out[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
        return out

    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(obj: Any, prefix: str) -> None:
        doc = docs(type(obj))
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"| `{prefix}{f.name}` | `{value!r}` | {doc.get(f.name, '')} |")

    walk(Recipe(), "")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m vrwkv_core.config > the README's recipe reference
    print(schema_reference())
