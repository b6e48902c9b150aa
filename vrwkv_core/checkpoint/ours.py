"""Our own files: model folders (`model.safetensors` + `config.yaml`), LM safetensors, RNN states.

A model folder holds `model.safetensors` (every weight) and `config.yaml` (the whole resolved
recipe that made the model); the safetensors metadata repeats the model config, so the file
also loads alone. An LM alone is one safetensors in the official layout with its dims in the
metadata; an RNN state is one safetensors of its per-layer tensors. Every write is atomic
(temp file + rename), so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from vrwkv_core.config import Recipe, recipe_from_dict, recipe_to_dict, recipe_to_yaml
from vrwkv_core.errors import CheckpointError
from vrwkv_core.fsutil import atomic_path
from vrwkv_core.model.rwkv.state import PARTS, RWKVState
from vrwkv_core.model.visual_rwkv import VisualRWKV

WEIGHTS = "model.safetensors"

CONFIG = "config.yaml"

FORMAT = "vrwkv-visualrwkv"

STATE_FORMAT = "vrwkv-rnn-state"


def save_pretrained(model: VisualRWKV, out_dir: str | Path, recipe: Recipe) -> Path:
    """Writes `out_dir/model.safetensors` and `out_dir/config.yaml` atomically."""
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
    if getattr(model.rwkv, "quant", None):  # the tensor names say it too; this is for people
        meta["quant"], meta["quant_head"] = model.rwkv.quant, model.rwkv.quant_head
    # Both temp files are written before either is renamed in; the weights go in first.
    with atomic_path(out / CONFIG) as c_tmp, atomic_path(out / WEIGHTS) as w_tmp:
        save_file(tensors, str(w_tmp), metadata=meta)
        c_tmp.write_text(recipe_to_yaml(recipe), encoding="utf-8")
    return out


def read_recipe(model_dir: str | Path) -> Recipe:
    """The recipe saved beside a model (its config.yaml), validated."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {model_dir} a vrwkv model folder?")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: malformed YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, (dict, type(None))):
        raise CheckpointError(f"{path}: not a recipe (a YAML {type(data).__name__})")
    return recipe_from_dict(data or {}, source=str(path))


def save_lm(model: Any, path: str | Path) -> None:
    """Writes an LM as safetensors in the official layout (atomic), dims in metadata."""
    version = model.version
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()}
    meta = {"format": f"vrwkv-rwkv{version[2]}", "version": version, "n_layer": str(model.n_layer),
            "n_embd": str(model.n_embd), "head_size": str(model.head_size),
            "vocab_size": str(model.vocab_size), "dim_ffn": str(model.dim_ffn)}  # fmt: skip
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def save_state(state: RWKVState, path: str | Path) -> None:
    """Writes an RNN state as safetensors (atomically: temp file + rename)."""
    tensors = {
        f"{part}.{i}": t.detach().contiguous().cpu() for part in PARTS for i, t in enumerate(getattr(state, part))
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT, "n_layer": str(state.n_layer)})


def load_state(path: str | Path, device: torch.device | str = "cpu") -> RWKVState:
    """Reads a state written by `save_state`."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            n_layer = int(meta.get("n_layer", -1))
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise CheckpointError(f"{path}: cannot read an RNN state ({err})") from None
    expected = {f"{part}.{i}" for part in PARTS for i in range(max(n_layer, 0))}
    if meta.get("format") != STATE_FORMAT or set(tensors) != expected:
        raise CheckpointError(f"{path}: not an RNN state written by RWKVState.save")
    return RWKVState(*([tensors[f"{part}.{i}"] for i in range(n_layer)] for part in PARTS))
