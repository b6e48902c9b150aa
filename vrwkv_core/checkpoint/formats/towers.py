"""Vision towers' own weight files, and the CLIP tower's key map.

`load_tower_file(towers, name, path)` loads one tower from its own file: timm, open_clip or
SAM layouts go through timm's checkpoint filters (open_clip's `visual.trunk.` stripped, SAM's
`image_encoder.` names mapped, position embeddings resampled to this tower's grid); CLIP
(v6.0) comes as transformers' CLIPVisionModel and maps onto timm's names by
`clip_from_transformers` (and back by `clip_to_transformers`), names relative to the tower:

    vision_model.embeddings.class_embedding [D]           -> cls_token [1, 1, D]
    vision_model.embeddings.position_embedding.weight     -> pos_embed [1, 577, D]
    vision_model.embeddings.patch_embedding.weight        -> patch_embed.proj.weight (no bias)
    vision_model.pre_layrnorm.*                           -> norm_pre.*
    vision_model.encoder.layers.{i}.layer_norm{1,2}.*     -> blocks.{i}.norm{1,2}.*
    vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.* -> blocks.{i}.attn.qkv.* (cat q, k, v)
    vision_model.encoder.layers.{i}.self_attn.out_proj.*  -> blocks.{i}.attn.proj.*
    vision_model.encoder.layers.{i}.mlp.fc{1,2}.*         -> blocks.{i}.mlp.fc{1,2}.*
    vision_model.post_layernorm.*                         -> norm.* (stored, unused)

(transformers 5.x names lack `vision_model.`; both are accepted.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from vrwkv_core.checkpoint.tensors import read_weights
from vrwkv_core.errors import CheckpointError
from vrwkv_core.model.vision import VisionTowers

_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")

_DIRECT = {  # transformers name (after `vision_model.`) -> timm name, tensors unchanged
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "pre_layrnorm.weight": "norm_pre.weight",
    "pre_layrnorm.bias": "norm_pre.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}

_LAYER_DIRECT = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}

_IGNORED = {"embeddings.position_ids"}  # a buffer (arange) older transformers files keep


def clip_from_transformers(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """transformers CLIPVisionModel tensors (names with or without `vision_model.`) -> timm's.

    Every name must be known (`embeddings.position_ids` is dropped); q/k/v come in threes.
    Works on meta tensors (names and shapes only).
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for full, t in sd.items():
        name = full[len("vision_model."):] if full.startswith("vision_model.") else full
        if name in _IGNORED:
            continue
        if name in _DIRECT:
            out[_DIRECT[name]] = t
        elif name == "embeddings.class_embedding":
            out["cls_token"] = t.reshape(1, 1, -1)
        elif name == "embeddings.position_embedding.weight":
            out["pos_embed"] = t.unsqueeze(0)
        elif m := _LAYER.fullmatch(name):
            i, rest = int(m.group(1)), m.group(2)
            mod, _, leaf = rest.rpartition(".")
            if mod in _LAYER_DIRECT:
                out[f"blocks.{i}.{_LAYER_DIRECT[mod]}.{leaf}"] = t
            elif mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, leaf), {})[mod[len("self_attn.")]] = t
            else:
                raise CheckpointError(f"{source}: unknown CLIP tensor {full}")
        else:
            raise CheckpointError(f"{source}: unknown CLIP tensor {full}")
    for (i, leaf), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: layer {i} {leaf} has only {sorted(parts)} of q, k, v projections")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat((parts["q"], parts["k"], parts["v"]), dim=0)
    return out

_HF_LAYER_ORDER = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                   "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")  # fmt: skip

_HF_TOP_ORDER = ("embeddings.class_embedding", "embeddings.patch_embedding.weight",
                 "embeddings.position_embedding.weight", "pre_layrnorm.weight", "pre_layrnorm.bias")  # fmt: skip


def _hf_rank(name: str) -> tuple:
    """Sort key giving transformers' module order (the order of the released files)."""
    if m := _LAYER.fullmatch(name):
        mod, _, leaf = m.group(2).rpartition(".")
        return (1, int(m.group(1)), _HF_LAYER_ORDER.index(mod), leaf != "weight")
    if name in _HF_TOP_ORDER:
        return (0, _HF_TOP_ORDER.index(name))
    return (2, name.endswith("bias"), name)  # post_layernorm


def clip_to_transformers(sd: Mapping[str, torch.Tensor], prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    """timm CLIP tensors -> transformers-4.x CLIPVisionModel names, in transformers' module
    order (inverse of `clip_from_transformers`)."""
    direct = {v: k for k, v in _DIRECT.items()}
    layer_direct = {v: k for k, v in _LAYER_DIRECT.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in direct:
            out[direct[name]] = t
        elif name == "cls_token":
            out["embeddings.class_embedding"] = t.reshape(-1)
        elif name == "pos_embed":
            out["embeddings.position_embedding.weight"] = t.squeeze(0)
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name):
            i, mod, leaf = m.groups()
            base = f"encoder.layers.{i}."
            if mod == "attn.qkv":
                for part, piece in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{base}self_attn.{part}_proj.{leaf}"] = piece
            elif mod in layer_direct:
                out[f"{base}{layer_direct[mod]}.{leaf}"] = t
            else:
                raise ValueError(f"no transformers name for timm CLIP tensor {name}")
        else:
            raise ValueError(f"no transformers name for timm CLIP tensor {name}")
    return {prefix + k: out[k] for k in sorted(out, key=_hf_rank)}


def load_clip_tower_file(model: nn.Module, path, source: str | None = None) -> None:
    """Loads OpenAI's CLIP ViT-L/14-336 weights (transformers' `pytorch_model.bin` or
    `model.safetensors` of openai/clip-vit-large-patch14-336) into a timm CLIP tower, strictly.

    Only the `vision_model.*` tensors are used; the text tower and projections are skipped.
    """
    path = Path(path)
    source = source or str(path)
    sd = read_weights(path)
    vision = {k: t for k, t in sd.items() if k.startswith("vision_model.")}
    if not vision:
        raise CheckpointError(f"{source}: no vision_model.* tensors: not a transformers CLIP checkpoint")
    tensors = clip_from_transformers(vision, source)
    ours = model.state_dict()
    missing = [k for k in ours if k not in tensors]
    unexpected = [k for k in tensors if k not in ours]
    wrong = [k for k in ours if k in tensors and tuple(tensors[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise CheckpointError(f"{source}: does not fit the CLIP ViT-L/14-336 tower ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(wrong)} wrong shape; e.g. {first})")  # fmt: skip
    model.load_state_dict({k: tensors[k].to(ours[k].dtype) for k in ours})


def _timm_filter(name: str) -> Callable:
    """timm's checkpoint filter for a tower (SAM's own, the ViT one for the others)."""
    from timm.models import vision_transformer, vision_transformer_sam

    return {"sam": vision_transformer_sam.checkpoint_filter_fn}.get(name, vision_transformer.checkpoint_filter_fn)


_OWN_LOADERS: dict[str, Callable[[nn.Module, Path], None]] = {"clip": load_clip_tower_file}
"""Towers whose files do not go through timm's filters."""


def load_tower_file(towers: VisionTowers, name: str, path: str | Path) -> None:
    """Loads one tower from its own weight file (timm, open_clip or SAM layout, any size).

    timm's checkpoint filters strip open_clip's `visual.trunk.`, map SAM's `image_encoder.`
    names and resample position embeddings to this tower's grid.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {name} tower file not found")
    model = towers.featurizer(name)
    if name in _OWN_LOADERS:
        return _OWN_LOADERS[name](model, path)
    state = _timm_filter(name)(read_weights(path), model)  # read_weights unwraps a `state_dict`/`model` level
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a {name} tower file: {len(missing)} tensors missing, e.g. {missing[0]}")
    for k in ours:
        if tuple(state[k].shape) != tuple(ours[k].shape):
            raise CheckpointError(
                f"{path}: {k} has shape {tuple(state[k].shape)}, the {name} tower needs {tuple(ours[k].shape)}"
            )
    model.load_state_dict({k: state[k] for k in ours})
