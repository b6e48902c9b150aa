"""Recipes: loading through OmegaConf, `key=value` overrides and value checks (the schema
dataclasses are in recipe_schema.py and re-exported here).

Precedence: schema defaults < the YAML recipe < `key=value` overrides. OmegaConf's struct
mode rejects unknown keys; every error names the key and the file. `load_recipe` is the
one entry point; `recipe_to_yaml` gives the resolved recipe back as pure YAML.

    recipe = load_recipe("recipes/tiny.yaml", ["pretrain.max_steps=10"])
"""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from vrwkv_core.errors import RecipeError
from vrwkv_core.textio import read_text

from vrwkv_core.recipe_schema import (  # the schema, re-exported: `from vrwkv_core.config import Recipe`
    RWKV_VERSIONS,
    WKV_BACKENDS,
    CLIP_GRID_SIZES,
    clip_tokens,
    RWKVSection,
    TinyTowerSection,
    TowerFilesSection,
    VisionSection,
    ProjectorSection,
    ModelSection,
    DataSection,
    PEFT_METHODS,
    DEFAULT_PEFT_TARGETS,
    PEFT_TARGETS,
    PeftSection,
    StageSection,
    HardwareSection,
    LoggingSection,
    Recipe,
)

_CHOICES = {
    "model.rwkv.version": RWKV_VERSIONS,
    "model.rwkv.wkv_backend": WKV_BACKENDS,
    "model.projector.type": ("mlp", "linear"),
    "model.image_position": ("first", "middle", "last"),
    "model.vision.tiny.stem": ("patch", "conv"),
    "data.order": ("shuffle", "original"),
    "data.truncation": ("whole_images", "original"),
    "hardware.accelerator": ("auto", "cpu", "gpu", "cuda"),
    "hardware.precision": ("bf16", "fp32"),
    "hardware.strategy": ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"),
}
_TOWERS = ("dino", "siglip", "sam", "clip", "tiny")
_LOSS_MEANS = ("labelled_samples", "all_samples")
_RENAMED = {"logit_l2": "l2wrap"}  # old stage key -> new one (its meaning changed too)
# The allowed range of every numeric key: (lowest, whether the lowest itself is allowed,
# highest or None, whether the highest is allowed). Stage keys apply to both stages.
_RANGES: dict[str, tuple[float, bool, float | None, bool]] = {
    "model.rwkv.n_layer": (1, True, None, False),
    "model.rwkv.n_embd": (1, True, None, False),
    "model.rwkv.head_size": (1, True, None, False),
    "model.rwkv.vocab_size": (1, True, None, False),
    "model.rwkv.dim_ffn": (1, True, None, False),
    "model.vision.image_size": (1, True, None, False),
    "model.vision.grid_size": (-1, True, None, False),
    "model.vision.tiny.width": (1, True, None, False),
    "model.vision.tiny.depth": (1, True, None, False),
    "model.vision.tiny.heads": (1, True, None, False),
    "model.vision.tiny.patch_size": (1, True, None, False),
    "model.tokens_per_image": (1, True, None, False),
    "data.ctx_len": (1, True, None, False),
    "data.val_fraction": (0, True, 1, False),
    "data.num_workers": (0, True, None, False),
    "stage.lr_init": (0, False, None, False),
    "stage.lr_final": (0, True, None, False),
    "stage.warmup_steps": (0, True, None, False),
    "stage.max_steps": (1, True, None, False),
    "stage.micro_batch": (1, True, None, False),
    "stage.grad_accum": (1, True, None, False),
    "stage.weight_decay": (0, True, None, False),
    "stage.grad_clip": (0, True, None, False),
    "stage.l2wrap": (0, True, None, False),
    "stage.frozen_layers": (0, True, None, False),
    "stage.devices": (1, True, None, False),
    "stage.global_batch": (1, True, None, False),
    "stage.save_every_steps": (0, True, None, False),
    "stage.val_every_steps": (0, True, None, False),
    "stage.seed": (0, True, 2**32 - 1, True),
    "stage.max_bad_steps": (1, True, None, False),
    "stage.tower_steps": (0, True, None, False),
    "stage.shared_prefix": (0, True, None, False),
    "stage.tower_lr": (0, False, None, False),
    "hardware.devices": (1, True, None, False),
    "hardware.nodes": (1, True, None, False),
    "hardware.ds_bucket_mb": (1, True, None, False),
}
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything this big is a mistake or an attack
MAX_RECIPE_NODES = 100_000  # values after YAML aliases are expanded ("billion laughs" guard)


def range_text(lo: float, lo_ok: bool, hi: float | None, hi_ok: bool) -> str:
    """A range in words: `>= 1`, `> 0`, `in [0, 1)`."""
    if hi is None:
        return f"{'>=' if lo_ok else '>'} {lo}"
    return f"in {'[' if lo_ok else '('}{lo}, {hi}{']' if hi_ok else ')'}"


def _check_ranges(recipe: "Recipe", bad: Any) -> None:
    """Every numeric key within its range, finite; lr_final <= lr_init; a non-empty out_dir."""
    import math

    for spec, (lo, lo_ok, hi, hi_ok) in _RANGES.items():
        keys = [spec.replace("stage.", f"{s}.", 1) for s in ("pretrain", "finetune")] if spec.startswith("stage.") else [spec]
        for key in keys:
            value = _get(recipe, key)
            if value is None:
                continue
            ok = math.isfinite(value) and (value >= lo if lo_ok else value > lo)
            if ok and hi is not None:
                ok = value <= hi if hi_ok else value < hi
            if not ok:
                raise bad(key, f"{value!r} is out of range: must be {range_text(lo, lo_ok, hi, hi_ok)}")
    for stage in ("pretrain", "finetune"):
        st = getattr(recipe, stage)
        if st.lr_final > st.lr_init:
            raise bad(f"{stage}.lr_final", f"{st.lr_final!r} is out of range: must be <= {stage}.lr_init ({st.lr_init!r})")
        if not str(st.out_dir).strip():
            raise bad(f"{stage}.out_dir", "is empty: name a folder for this stage's outputs")
_TRAINABLE = ("projector", "rwkv", "rwkv.emb", "rwkv.head", "vision")


def _validate(recipe: Recipe, source: str) -> None:
    """Checks values the type system cannot: choices, ranges, shapes."""

    def bad(key: str, msg: str) -> RecipeError:
        return RecipeError(f"{source}: {key}: {msg}")

    for key, choices in _CHOICES.items():
        value = _get(recipe, key)
        if value not in choices:
            raise bad(key, f"{value!r} is not one of {', '.join(choices)}")
    _check_ranges(recipe, bad)
    rw = recipe.model.rwkv
    if rw.n_embd % rw.head_size:
        raise bad("model.rwkv.n_embd", f"{rw.n_embd} is not a multiple of head_size {rw.head_size}")
    side = round(recipe.model.tokens_per_image**0.5)
    grid = recipe.model.vision.grid_size
    if "clip" in recipe.model.vision.towers:
        # CLIP (v6.0): its 24x24 patch rows (or v6.0's grid pooling of them) plus the CLS row.
        if grid not in CLIP_GRID_SIZES:
            raise bad("model.vision.grid_size", f"{grid} does not divide the clip tower's 24x24 patch grid; "
                                                f"choose one of {', '.join(map(str, CLIP_GRID_SIZES))}")
        if recipe.model.tokens_per_image != clip_tokens(grid):
            raise bad("model.tokens_per_image", f"the clip tower with model.vision.grid_size {grid} gives "
                                                f"{clip_tokens(grid)} tokens, not {recipe.model.tokens_per_image}")
    elif grid != -1:
        raise bad("model.vision.grid_size", f"{grid}: only the clip tower (v6.0) pools by grid; leave it at -1")
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
        if st.loss_mean not in _LOSS_MEANS:
            raise bad(f"{stage}.loss_mean", f"{st.loss_mean!r} is not one of {', '.join(_LOSS_MEANS)}")
        if not 0 <= st.frozen_layers <= rw.n_layer:
            raise bad(f"{stage}.frozen_layers", f"must be in [0, n_layer={rw.n_layer}]")
        _validate_peft(st.peft, f"{stage}.peft", bad)
    for stage in ("pretrain", "finetune"):
        _derive_grad_accum(recipe, stage, bad)


def stage_devices(recipe: Recipe, stage: str) -> int:
    """Devices per node for `stage`: `<stage>.devices`, else hardware.devices."""
    st: StageSection = getattr(recipe, stage)
    return st.devices if st.devices is not None else recipe.hardware.devices


def _derive_grad_accum(recipe: Recipe, stage: str, bad: Any) -> None:
    """global_batch set: grad_accum = global_batch / (micro_batch x devices x nodes), exactly."""
    st: StageSection = getattr(recipe, stage)
    if st.global_batch is None:
        return
    per_step = st.micro_batch * stage_devices(recipe, stage) * recipe.hardware.nodes
    if st.global_batch % per_step:
        raise bad(f"{stage}.global_batch", f"{st.global_batch} is not a multiple of micro_batch x devices x nodes = {per_step}")
    st.grad_accum = st.global_batch // per_step


def _yaml_ok(text: str) -> bool:
    import yaml

    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return True


def check_expansion(data: Any, source: str, limit: int = MAX_RECIPE_NODES) -> None:
    """Refuses YAML whose aliases expand to more than `limit` values (a "billion laughs" bomb).

    PyYAML shares one object per anchor, so counting with a memo stays fast however large
    the expansion would be; OmegaConf would copy every reference.
    """
    sizes: dict[int, int] = {}

    def size(obj: Any) -> int:
        if not isinstance(obj, (dict, list)):
            return 1
        if id(obj) in sizes:
            return sizes[id(obj)]
        sizes[id(obj)] = limit + 1  # a cycle (a recursive alias) counts as too large
        children = obj.values() if isinstance(obj, dict) else obj
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        sizes[id(obj)] = total
        return total

    if size(data) > limit:
        raise RecipeError(f"{source}: the YAML expands to more than {limit:,} values (aliases repeated too often)",
                          hint="a recipe is a small mapping; remove the repeated aliases")


def _validate_peft(pf: PeftSection, key: str, bad: Any) -> None:
    """The `peft` section of a stage: a known method and targets, sensible sizes."""
    if pf.method is None:
        return
    if pf.method not in PEFT_METHODS:
        raise bad(f"{key}.method", f"{pf.method!r} is not one of {', '.join(PEFT_METHODS)} (or null)")
    if pf.init not in ("default", "pissa"):
        raise bad(f"{key}.init", f"{pf.init!r} is not one of default, pissa")
    if pf.init == "pissa" and pf.method != "lora":
        raise bad(f"{key}.init", f"pissa is a LoRA initialisation; method {pf.method} takes init: default")
    if pf.method == "state":
        if not pf.state_lr > 0:
            raise bad(f"{key}.state_lr", "must be positive")
        return
    for sub, value in (("r", pf.r), ("alpha", pf.alpha)):
        if not value > 0:
            raise bad(f"{key}.{sub}", "must be positive")
    if not 0.0 <= pf.dropout < 1.0:
        raise bad(f"{key}.dropout", "must be in [0, 1)")
    if not pf.targets:
        raise bad(f"{key}.targets", f"needs at least one layer: {', '.join(PEFT_TARGETS)}")
    for target in pf.targets:
        if target not in PEFT_TARGETS:
            raise bad(f"{key}.targets", f"unknown layer {target!r}; choose from {', '.join(PEFT_TARGETS)}")


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
    # a key YAML allows can hold a line break or control character: show it escaped, on one line
    shown = f"'{key}'" if key.isprintable() else repr(key)
    if isinstance(err, ConfigKeyError) or "not in struct" in msg or "Key '" in msg and "not" in msg:
        head, _, last = key.rpartition(".")
        if last in _RENAMED:
            new = f"{head}.{_RENAMED[last]}" if head else _RENAMED[last]
            return RecipeError(f"{source}: {shown} was replaced by '{new}'",
                               hint=f"use {new}: 1.0e-4 (the original's L2Wrap; 0 disables)")
        close = difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "see the recipe reference in README.md"
        return RecipeError(f"{source}: unknown key {shown}", hint=hint)
    if isinstance(err, OmegaConfBaseException) and "Missing mandatory value" in msg:
        return RecipeError(f"{source}: missing required value {shown}")
    if key:
        return RecipeError(f"{source}: {key if key.isprintable() else shown}: {msg}")
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
        if not p.exists() and not p.is_symlink():
            raise RecipeError(f"{source}: recipe file not found", hint="pass a path such as recipes/tiny.yaml")
        text = read_text(p, max_bytes=MAX_RECIPE_BYTES, what="recipe", error=RecipeError)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise RecipeError(f"{source}: malformed YAML{where}: {problem}") from None
        except RecursionError:
            raise RecipeError(f"{source}: the YAML is nested too deeply to be a recipe") from None
        if data is None:
            data = {}
        try:
            check_expansion(data, source)
        except RecursionError:
            raise RecipeError(f"{source}: the YAML is nested too deeply to be a recipe") from None
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
            except yaml.YAMLError as err:  # a value YAML cannot hold, e.g. a NUL byte
                problem = getattr(err, "problem", None) or getattr(err, "reason", None) or str(err).splitlines()[0]
                bad_item = next((o for o in overrides if not _yaml_ok(o.partition("=")[2])), overrides[0])
                raise RecipeError(f"override {bad_item!r}: a value YAML cannot read ({problem})") from None
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _friendly(err, source) from None
    except TypeError as err:  # OmegaConf: a mapping where the schema has a list, or the reverse
        raise RecipeError(f"{source}: {str(err).splitlines()[0]} (a mapping where the schema has a list, or the "
                          "reverse)", hint="see the recipe reference in README.md") from None
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
