"""Loading models: our folders, lone safetensors, released `.pth` files of any family, `hub:NAME`.

`load_checkpoint(path_or_dir)` takes any of: one of our model folders, a lone
`model.safetensors` (its metadata holds the model config), a released `.pth` (its family
recognised by its tensors through `formats.released_format`), or `hub:NAME`; it returns
(model in eval mode, its recipe). Loading is strict: every tensor of the file is used and
every parameter filled. `load_lm(cls, path)` is `RWKV7/RWKV6.from_checkpoint`.

    model, recipe = load_checkpoint("VisualRWKV-v0700-0B1-v1.0-20250109.pth")
    model, recipe = load_checkpoint("out/tiny/finetune")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from vrwkv_core.checkpoint.build import assign_state, build_meta, lm_from_state_dict, lora_of
from vrwkv_core.checkpoint.formats import released_format
from vrwkv_core.checkpoint.formats.released_v0700 import DEFAULT_TOKENS_PER_IMAGE, ours_to_released
from vrwkv_core.checkpoint.ours import FORMAT, WEIGHTS, read_recipe
from vrwkv_core.checkpoint.tensors import check_names, check_vocab, read_safetensors, read_weights, safetensors_metadata
from vrwkv_core.config import ModelSection, Recipe, recipe_from_dict
from vrwkv_core.errors import CheckpointError
from vrwkv_core.hub import resolve
from vrwkv_core.model.rwkv.layers import RWKVLanguageModel
from vrwkv_core.model.rwkv.quant import quantized_layout
from vrwkv_core.model.visual_rwkv import VisualRWKV


def load_lm(
    cls: type[RWKVLanguageModel], path: str | Path, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """`RWKV7/RWKV6.from_checkpoint`: an official RWKV World `.pth` or a `.safetensors` from `save`."""
    return lm_from_state_dict(cls, read_weights(path), str(path), device, dtype)


def load_ours(
    sd: Mapping[str, torch.Tensor], model_cfg: ModelSection, source: str,
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
) -> VisualRWKV:
    """A VisualRWKV for `model_cfg` holding exactly `sd` (our names), in eval mode."""
    model = build_meta(model_cfg, lora_of(sd, source))
    quantized_layout(model.rwkv, {k: tuple(t.shape) for k, t in sd.items()}, prefix="rwkv.")
    check_names({k: tuple(t.shape) for k, t in model.state_dict().items()}, {k: tuple(t.shape) for k, t in sd.items()}, source)
    assign_state(model, sd, source, device, dtype)
    return model.eval()


def load_pretrained(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[VisualRWKV, Recipe]:
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
    return load_ours(read_safetensors(weights), recipe.model, str(weights), device, dtype), recipe


def _model_from_metadata(meta: Mapping[str, str], source: str) -> ModelSection | None:
    """The ModelSection our safetensors metadata records (None for other files)."""
    if meta.get("format") != FORMAT or "model_config" not in meta:
        return None
    try:
        data = json.loads(meta["model_config"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{source}: unreadable model_config in the safetensors metadata") from None
    return recipe_from_dict({"model": data}, source=f"{source} (metadata)").model


def load_checkpoint(
    path_or_dir: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[VisualRWKV, Recipe]:
    """(model in eval mode, its recipe) from one of our folders, a lone `model.safetensors`,
    a released `.pth`, or `hub:NAME`.

    dtype None keeps our files' stored dtype, and gives released files (stored in half
    precision) float32 on CPU and bfloat16 on CUDA.
    """
    text = str(path_or_dir)
    if text.startswith("hub:"):
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
        model_cfg = _model_from_metadata(safetensors_metadata(path), str(path))
        sd = read_safetensors(path)
        if model_cfg is not None:  # ours: our names, stored dtype kept unless asked
            model = load_ours(sd, model_cfg, str(path), device if device is not None else "cpu", dtype)
        else:  # a safetensors copy of a released file (our SAM names accepted too)
            model = from_released_state_dict({ours_to_released(k): t for k, t in sd.items()}, str(path), device, dtype)
        return model, Recipe(name=path.parent.name or path.stem, model=model.config)
    return load_released(path, device, dtype)


def load_visual_rwkv(
    path_or_dir: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> VisualRWKV:
    """`VisualRWKV.from_checkpoint`: the model of `load_checkpoint`, in eval mode."""
    return load_checkpoint(path_or_dir, device, dtype)[0]


def from_released_state_dict(
    sd: Mapping[str, torch.Tensor],
    source: str = "<state dict>",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    model_cfg: ModelSection | None = None,
    tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE,
) -> VisualRWKV:
    """A VisualRWKV holding exactly the tensors of a released-layout state dict (strict).

    The config is inferred unless `model_cfg` is given. dtype None: bfloat16 on CUDA,
    float32 elsewhere; device "meta" checks names and shapes without any data.
    """
    fmt = released_format(sd, source)
    if model_cfg is None:
        model_cfg, lora = fmt.infer_model_config(sd, source, tokens_per_image)
    else:
        if "rwkv.emb.weight" in sd:
            check_vocab(sd["rwkv.emb.weight"].shape[0], source)
        lora = lora_of(sd, source)
    model = build_meta(model_cfg, lora)
    expected = {k: tuple(t.shape) for k, t in fmt.to_released(model.state_dict()).items()}
    check_names(expected, {k: tuple(t.shape) for k, t in sd.items() if k not in fmt.IGNORED}, source)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    assign_state(model, fmt.to_ours(sd, source), source, device, dtype)
    return model.eval()


def load_released(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE,
    model_cfg: ModelSection | None = None,
) -> tuple[VisualRWKV, Recipe]:
    """Loads a released VisualRWKV `.pth` (any family, recognised by its tensors) strictly; returns (model in eval mode, a recipe for it)."""
    path = Path(path)
    sd = read_weights(path)
    model = from_released_state_dict(sd, str(path), device, dtype, model_cfg, tokens_per_image)
    del sd
    return model, Recipe(name=path.stem, model=model.config)
