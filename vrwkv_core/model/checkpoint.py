"""Our model format: a folder with `model.safetensors` (every weight) and `config.yaml`.

`config.yaml` is the whole resolved recipe that made the model; the safetensors metadata
repeats the model dimensions so a file can be identified alone. Writes are atomic (temp
file + rename), so a crash never leaves a half-written model that loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vrwkv_core.errors import CheckpointError

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe
    from vrwkv_core.model.visual_rwkv import VisualRWKV

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
FORMAT = "vrwkv-visualrwkv"


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pretrained(model: "VisualRWKV", out_dir: str | Path, recipe: "Recipe") -> Path:
    """Writes `out_dir/model.safetensors` and `out_dir/config.yaml` atomically."""
    from safetensors.torch import save_file

    from vrwkv_core.config import recipe_to_yaml

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
    }
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    _fsync_replace(tmp, out / WEIGHTS)
    tmp = out / f".{CONFIG}.tmp"
    tmp.write_text(recipe_to_yaml(recipe), encoding="utf-8")
    _fsync_replace(tmp, out / CONFIG)
    return out


def read_recipe(model_dir: str | Path) -> "Recipe":
    """The recipe saved beside a model (its config.yaml), validated."""
    import yaml

    from vrwkv_core.config import recipe_from_dict

    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {model_dir} a vrwkv model folder?")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: malformed YAML ({str(err).splitlines()[0]})") from None
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
        raise CheckpointError(f"{path}: not a readable safetensors file ({first})") from None


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Loads `sd` into `model`, every tensor used and every parameter filled, else one error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(n for n in set(sd) & set(expected) if tuple(sd[n].shape) != tuple(expected[n].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:
                shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        raise CheckpointError(f"{source}: weights do not fit the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True, assign=assign)


def build_empty(recipe: "Recipe") -> "VisualRWKV":
    """A VisualRWKV for `recipe.model` with weights on the meta device (to be assigned)."""
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    with torch.device("meta"):
        return VisualRWKV(recipe.model)


def load_pretrained(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple["VisualRWKV", "Recipe"]:
    """Loads one of our model folders bit-exactly; returns (model in eval mode, its recipe)."""
    model_dir = Path(model_dir)
    recipe = read_recipe(model_dir)
    sd = read_safetensors(model_dir / WEIGHTS)
    model = build_empty(recipe)
    load_state_strict(model, sd, str(model_dir / WEIGHTS), assign=True)
    _materialize_buffers(model)
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval(), recipe


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers built on the meta device are recomputed on CPU."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                raise CheckpointError(
                    f"internal: buffer {type(module).__name__}.{name} was not restored when loading"
                )


def state_dict_summary(sd: dict[str, Any]) -> str:
    """A one-line description of a state dict (for error messages)."""
    n = sum(t.numel() for t in sd.values() if isinstance(t, torch.Tensor))
    return f"{len(sd)} tensors, {n / 1e6:.1f}M values"
