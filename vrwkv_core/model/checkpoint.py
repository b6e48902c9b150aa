"""Loading and saving VisualRWKV: our model folders, released files, and new models from parts.

Our format is a folder with `model.safetensors` (every weight) and `config.yaml` (the
whole resolved recipe that made the model); the safetensors metadata repeats the
model config, so the file also loads alone. Writes are atomic (temp file + rename), so a
crash never leaves a half-written model under the final name.

`load_checkpoint` / `load_visual_rwkv` take any of: one of our folders, a lone
`model.safetensors`, a released `.pth` (see `released.py`), or `hub:NAME`. Models are
built on the meta device and the file's tensors assigned (no random init, no copy when
dtype and device already match); loading is strict. Non-persistent buffers, which no
file holds, are recomputed by building their part on CPU (`materialize_buffers`).

`build_from_parts(recipe)` starts a new model from an RWKV-7 World `.pth`
(`model.rwkv.checkpoint`) plus tower files (`model.vision.checkpoints`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from vrwkv_core.errors import CheckpointError
from vrwkv_core.fsutil import atomic_path
from vrwkv_core.model.lm_weights import check_names

if TYPE_CHECKING:
    from vrwkv_core.config import ModelSection, Recipe
    from vrwkv_core.model.rwkv7 import LoraDims
    from vrwkv_core.model.visual_rwkv import VisualRWKV

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
FORMAT = "vrwkv-visualrwkv"


def save_pretrained(model: "VisualRWKV", out_dir: str | Path, recipe: "Recipe") -> Path:
    """Writes `out_dir/model.safetensors` and `out_dir/config.yaml` atomically."""
    from safetensors.torch import save_file

    from vrwkv_core.config import recipe_to_dict, recipe_to_yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()}
    cfg = recipe.model
    meta = {
        "format": FORMAT,
        "version": cfg.rwkv.version,
        "n_layer": str(cfg.rwkv.n_layer),
        "n_embd": str(cfg.rwkv.n_embd),
        "head_size": str(cfg.rwkv.head_size),
        "vocab_size": str(cfg.rwkv.vocab_size),
        "towers": json.dumps(list(cfg.vision.towers)),
        "projector": cfg.projector.type,
        "tokens_per_image": str(cfg.tokens_per_image),
        "model_config": json.dumps(recipe_to_dict(recipe)["model"]),
    }
    # Both temp files are written before either is renamed in; the weights go in first.
    with atomic_path(out / CONFIG) as c_tmp, atomic_path(out / WEIGHTS) as w_tmp:
        save_file(tensors, str(w_tmp), metadata=meta)
        c_tmp.write_text(recipe_to_yaml(recipe), encoding="utf-8")
    return out


def read_recipe(model_dir: str | Path) -> "Recipe":
    """The recipe saved beside a model (its config.yaml), validated."""
    import yaml

    from vrwkv_core.config import recipe_from_dict

    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {model_dir} a vrwkv model folder?")
    from vrwkv_core.config import MAX_RECIPE_BYTES, check_expansion
    from vrwkv_core.textio import read_text

    text = read_text(path, max_bytes=MAX_RECIPE_BYTES, what="config.yaml", error=CheckpointError)
    try:
        data = yaml.safe_load(text)
        check_expansion(data, str(path))
    except RecursionError:
        raise CheckpointError(f"{path}: the YAML is nested too deeply to be a recipe") from None
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: malformed YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, (dict, type(None))):
        raise CheckpointError(f"{path}: not a recipe (a YAML {type(data).__name__})")
    return recipe_from_dict(data or {}, source=str(path))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a truncated or foreign file is a CheckpointError."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for bad headers
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({first})") from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata header of a safetensors file ({} when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({first})") from None


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Loads `sd` into `model`, every tensor used and every parameter filled, else one error."""
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    check_names(expected, {k: tuple(t.shape) for k, t in sd.items()}, source)
    model.load_state_dict(sd, strict=True, assign=assign)


def lora_of(sd: Mapping[str, torch.Tensor], source: str, prefix: str = "rwkv.") -> "LoraDims | None":
    """LoRA widths of the LM tensors in `sd` (None when there is no LM to read them from)."""
    from vrwkv_core.model.rwkv6 import lm_config_from_state_dict

    lm = {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
    if "emb.weight" not in lm:
        return None
    return lm_config_from_state_dict(lm, source)[1]


def build_meta(model_cfg: "ModelSection", lora: "LoraDims | None" = None) -> "VisualRWKV":
    """A VisualRWKV with every weight on the meta device; `lora` overrides the default widths."""
    from vrwkv_core.model.rwkv7 import RWKV7
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    with torch.device("meta"):
        model = VisualRWKV(model_cfg)
        if lora is not None and lora != model.rwkv.lora:
            model.rwkv = type(model.rwkv)(model_cfg.rwkv, lora, init=False)
    return model


def build_empty(recipe: "Recipe") -> "VisualRWKV":
    """A VisualRWKV for `recipe.model` with weights on the meta device (to be assigned)."""
    return build_meta(recipe.model)


def assign_state(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    materialize: bool = True,
) -> None:
    """Assigns `sd` (names already checked) to a meta-built model on `device`, floats cast to
    `dtype` (None keeps the file's); then recomputes non-persistent buffers (`model` must then
    be the whole VisualRWKV)."""
    device = torch.device(device)
    expected = model.state_dict()
    tensors = {}
    for name, t in sd.items():
        want_float = expected[name].is_floating_point()
        if want_float != t.is_floating_point():
            raise CheckpointError(f"{source}: {name} has dtype {t.dtype}, expected a {expected[name].dtype} tensor")
        tensors[name] = t.to(device=device, dtype=dtype if (dtype is not None and want_float) else t.dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    if materialize and device.type != "meta":
        materialize_buffers(model, device, dtype)


def _rebuild_part(model: "VisualRWKV", part: str) -> torch.nn.Module:
    """A freshly built copy (on CPU) of the model part that owns a buffer."""
    from vrwkv_core.model.projector import build_projector
    from vrwkv_core.model.vision import build_featurizer
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    cfg = model.config
    with torch.device("cpu"):
        if part.startswith("vit.") and part.endswith("_featurizer"):
            return build_featurizer(part[len("vit."):-len("_featurizer")], cfg.vision)
        if part == "rwkv":
            return type(model.rwkv)(model.rwkv.cfg, model.rwkv.lora)
        if part == "proj":
            return build_projector(cfg.projector.type, model.vit.embed_dim, cfg.rwkv.n_embd)
        return VisualRWKV(cfg)


def _part_of(module_path: str) -> str:
    parts = module_path.split(".")
    if parts[0] == "vit" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0] if parts[0] in ("rwkv", "proj") else ""


def materialize_buffers(model: torch.nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
    """Non-persistent buffers left on meta (no file holds them, e.g. timm's rope tables) are
    taken from a CPU build of their part; any other meta tensor left is an internal error."""
    device = torch.device(device)
    rebuilt: dict[str, torch.nn.Module] = {}
    for path, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            part = _part_of(path)
            if part not in rebuilt:
                rebuilt[part] = _rebuild_part(model, part)  # type: ignore[arg-type]
            sub = path if not part else path[len(part) + 1:]  # "" when the part itself owns it
            value = getattr(rebuilt[part].get_submodule(sub), name)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            module._buffers[name] = value.to(device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"internal: {len(left)} tensors still on the meta device after loading, e.g. {left[0]}")


def _to_empty(module: torch.nn.Module) -> None:
    """Uninitialised CPU storage for a meta module's weights, to be filled by load_state_dict;
    non-persistent buffers stay on meta so `materialize_buffers` computes them."""
    kept = [(m, n) for m in module.modules() for n in m._non_persistent_buffers_set if m._buffers.get(n) is not None]
    module.to_empty(device="cpu")
    for m, n in kept:
        m._buffers[n] = torch.empty_like(m._buffers[n], device="meta")


def _model_from_metadata(meta: Mapping[str, str], source: str) -> "ModelSection | None":
    """The ModelSection our safetensors metadata records (None for other files)."""
    from vrwkv_core.config import recipe_from_dict

    if meta.get("format") != FORMAT or "model_config" not in meta:
        return None
    try:
        data = json.loads(meta["model_config"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{source}: unreadable model_config in the safetensors metadata") from None
    return recipe_from_dict({"model": data}, source=f"{source} (metadata)").model


def load_pretrained(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple["VisualRWKV", "Recipe"]:
    """Loads one of our model folders bit-exactly; returns (model in eval mode, its recipe).

    dtype None keeps the stored dtype.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a folder")
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"{model_dir}: no {WEIGHTS}; not a vrwkv model folder",
            hint="a model folder holds config.yaml and model.safetensors, as `vrwkv pretrain`/`finetune` write them",
        )
    recipe = read_recipe(model_dir)
    sd = read_safetensors(weights)
    model = build_meta(recipe.model, lora_of(sd, str(weights)))
    load_names = {k: tuple(t.shape) for k, t in sd.items()}
    check_names({k: tuple(t.shape) for k, t in model.state_dict().items()}, load_names, str(weights))
    assign_state(model, sd, str(weights), device, dtype)
    return model.eval(), recipe


def load_checkpoint(
    path_or_dir: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple["VisualRWKV", "Recipe"]:
    """(model in eval mode, its recipe) from one of our folders, a lone `model.safetensors`,
    a released `.pth`, or `hub:NAME`.

    dtype None keeps our files' stored dtype, and gives released files (stored in half
    precision) float32 on CPU and bfloat16 on CUDA.
    """
    from vrwkv_core.config import Recipe
    from vrwkv_core.model.released import from_released_state_dict, load_released

    text = str(path_or_dir)
    if text.startswith("hub:"):
        from vrwkv_core.hub import resolve

        path = resolve(text)
    else:
        path = Path(text).expanduser()
    if path.is_dir():
        return load_pretrained(path, device if device is not None else "cpu", dtype)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or folder", hint="pass a released .pth, a vrwkv model folder, or hub:NAME"
        )
    if path.suffix == ".safetensors":
        meta = safetensors_metadata(path)
        model_cfg = _model_from_metadata(meta, str(path))
        from vrwkv_core.model.vision import ours_to_released

        sd = {ours_to_released(k): t for k, t in read_safetensors(path).items()}
        if model_cfg is not None:
            if dtype is None:
                dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), None)
        model = from_released_state_dict(sd, str(path), device, dtype, model_cfg)
        return model, Recipe(name=path.parent.name or path.stem, model=model.config)
    return load_released(path, device, dtype)


def load_visual_rwkv(
    path_or_dir: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> "VisualRWKV":
    """`VisualRWKV.from_checkpoint`: the model of `load_checkpoint`, in eval mode."""
    return load_checkpoint(path_or_dir, device, dtype)[0]


def build_from_parts(recipe: "Recipe") -> "VisualRWKV":
    """A new VisualRWKV (float32, CPU) from `model.rwkv.checkpoint` (an RWKV-7 World `.pth`)
    plus `model.vision.checkpoints` tower files; towers without a file and the projector
    are freshly initialised (seed the RNG first for a reproducible init).

    The LM file must match the recipe's dims and have the World vocab; tower files go
    through timm's checkpoint filters (names mapped, position embeddings resampled).
    """
    from dataclasses import replace

    from vrwkv_core.hub import resolve
    from vrwkv_core.model.projector import build_projector
    from vrwkv_core.model.released import check_vocab, read_weights_file
    from vrwkv_core.model.rwkv6 import default_dim_ffn
    from vrwkv_core.model.rwkv6 import lm_config_from_state_dict as config_from_state_dict
    from vrwkv_core.model.vision import build_featurizer, featurizer_attr, load_tower_file

    m = recipe.model
    if not m.rwkv.checkpoint:
        raise CheckpointError("model.rwkv.checkpoint is not set: nothing to build the language model from")
    lm_path = resolve(m.rwkv.checkpoint)
    lm = read_weights_file(lm_path)
    source = str(lm_path)
    if "emb.weight" in lm:
        check_vocab(lm["emb.weight"].shape[0], source)
    file_cfg, lora = config_from_state_dict(lm, source)
    ffn = default_dim_ffn(m.rwkv.n_embd) if m.rwkv.version == "x060" else 4 * m.rwkv.n_embd
    want = replace(m.rwkv, dim_ffn=m.rwkv.dim_ffn or ffn)
    if file_cfg.version != m.rwkv.version:
        raise CheckpointError(f"{source}: an {file_cfg.version} checkpoint, but model.rwkv.version is {m.rwkv.version}")
    for key in ("n_layer", "n_embd", "head_size", "vocab_size", "dim_ffn"):
        if getattr(file_cfg, key) != getattr(want, key):
            raise CheckpointError(
                f"{source}: has {key} {getattr(file_cfg, key)}, but the recipe's model.rwkv.{key} is {getattr(want, key)}",
                hint="set model.rwkv.n_layer/n_embd/head_size to the checkpoint's, or pick the checkpoint of this size",
            )
    model = build_meta(m, lora)
    check_names({k: tuple(t.shape) for k, t in model.rwkv.state_dict().items()},
                {k: tuple(t.shape) for k, t in lm.items()}, source)  # fmt: skip
    assign_state(model.rwkv, lm, source, "cpu", torch.float32, materialize=False)  # done once at the end
    del lm
    for name in m.vision.towers:
        spec = getattr(m.vision.checkpoints, name, None)
        if spec:
            _to_empty(model.vit.featurizer(name))
            load_tower_file(model.vit, name, resolve(spec))
        else:
            with torch.device("cpu"):
                setattr(model.vit, featurizer_attr(name), build_featurizer(name, m.vision))
    model.vit.freeze(m.vision.freeze)
    with torch.device("cpu"):
        model.proj = build_projector(m.projector.type, model.vit.embed_dim, m.rwkv.n_embd)
    materialize_buffers(model, "cpu", None)
    return model


def state_dict_summary(sd: dict[str, Any]) -> str:
    """A one-line description of a state dict (for error messages)."""
    n = sum(t.numel() for t in sd.values() if isinstance(t, torch.Tensor))
    return f"{len(sd)} tensors, {n / 1e6:.1f}M values"
