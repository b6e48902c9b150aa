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

from vrwkv_core.checkpoint.tensors import first_line
from vrwkv_core.config import (
    MAX_RECIPE_BYTES,
    Recipe,
    check_expansion,
    recipe_from_dict,
    recipe_to_dict,
    recipe_to_yaml,
)
from vrwkv_core.errors import CheckpointError
from vrwkv_core.fsutil import atomic_path
from vrwkv_core.model.rwkv.state import PARTS, RWKVState
from vrwkv_core.model.visual_rwkv import VisualRWKV
from vrwkv_core.textio import read_text

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


def load_state(path: str | Path, device: torch.device | str = "cpu", model: Any = None) -> RWKVState:
    """Reads a state written by `save_state`, checking every tensor's shape and dtype (the shifts
    floating point [B, C], the WKV matrices float32 [B, H, N, N], one batch size); with `model`
    (anything with n_layer, n_embd, head_size) the state must also fit that model."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise CheckpointError(f"{path}: cannot read an RNN state ({first_line(err)})") from None
    try:
        n_layer = int(meta.get("n_layer", -1))
    except ValueError:
        n_layer = -1
    expected = {f"{part}.{i}" for part in PARTS for i in range(max(n_layer, 0))}
    if meta.get("format") != STATE_FORMAT or n_layer < 1 or set(tensors) != expected:
        raise CheckpointError(f"{path}: not an RNN state written by RWKVState.save")
    state = RWKVState(*([tensors[f"{part}.{i}"] for i in range(n_layer)] for part in PARTS))
    problem = state_mismatch(state, model)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return state


def state_mismatch(state: RWKVState, model: Any = None) -> str | None:
    """What is wrong with a state's tensors (for `model`, when given), or None."""
    B = state.wkv[0].shape[0] if state.wkv[0].dim() == 4 else -1
    C = state.att_shift[0].shape[-1] if state.att_shift[0].dim() == 2 else -1
    H, N = (state.wkv[0].shape[1], state.wkv[0].shape[2]) if state.wkv[0].dim() == 4 else (-1, -1)
    if model is not None:
        want = (model.n_layer, model.n_embd, model.n_embd // model.head_size, model.head_size)
        if (state.n_layer, C, H, N) != want:
            return (f"the state is for {state.n_layer} layers, width {C}, {H} heads of {N}; the model has "
                    f"{want[0]} layers, width {want[1]}, {want[2]} heads of {want[3]}")
    for i in range(state.n_layer):
        for part, t, shape in (("att_shift", state.att_shift[i], (B, C)), ("wkv", state.wkv[i], (B, H, N, N)),
                               ("ffn_shift", state.ffn_shift[i], (B, C))):  # fmt: skip
            if tuple(t.shape) != shape:
                return f"{part}.{i} has shape {tuple(t.shape)}, expected {shape}"
            if not t.is_floating_point() or (part == "wkv" and t.dtype != torch.float32):
                return f"{part}.{i} has dtype {str(t.dtype).removeprefix('torch.')}, expected " + (
                    "float32" if part == "wkv" else "a floating-point type")
            if not bool(torch.isfinite(t).all()):
                return f"{part}.{i} holds non-finite values"
    return None
