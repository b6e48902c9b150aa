"""The CLIP ViT-L/14-336 vision tower of VisualRWKV v6.0: timm model, key map, features, transform.

Choice: timm's `vit_large_patch14_clip_quickgelu_336` (already a dependency, builds on the
meta device, never downloads with pretrained=False) instead of transformers'
CLIPVisionModel, whose names the released files use. The two compute the same function:
[CLS, patches] + position embedding, pre-LayerNorm (`norm_pre`), 24 pre-norm blocks with
QuickGELU MLPs. The released tensors map onto timm's by `clip_from_transformers` (and back
by `clip_to_transformers`), names relative to the tower:

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

Features (`clip_features`): the last block's output before the final norm, 577 x 1024,
with the CLS row moved from first to LAST: [576 patches row-major, CLS]. No pooling.
Transform (`clip_preprocess`): RGB, shortest side to 336 (bicubic), centre crop 336,
/255, CLIP mean/std; no pad-to-square. `clip_patch_spans` finds, in ids with image
placeholders, the 576 patch rows of each image: the rows the v6.0 LM reverses in odd layers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from vrwkv_core.errors import CheckpointError

if TYPE_CHECKING:
    from PIL import Image

CLIP_TIMM_NAME = "vit_large_patch14_clip_quickgelu_336"
CLIP_SIZE = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_PATCHES = 576  # 24 x 24
CLIP_TOKENS = CLIP_PATCHES + 1  # patches, then CLS
CLIP_DIM = 1024

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


def build_clip_tower(**overrides) -> nn.Module:
    """A randomly initialised timm CLIP ViT-L/14-336 (never downloads). `overrides` go to
    timm (tests build small variants of the same architecture with them)."""
    import timm

    return timm.create_model(CLIP_TIMM_NAME, pretrained=False, num_classes=0, **overrides)


def clip_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] -> [N, 1 + (S/14)^2, D]: last block, no final norm, CLS row last."""
    depth = len(model.blocks)
    ((patches, prefix),) = model.forward_intermediates(
        pixels, indices=[depth - 1], norm=False, stop_early=True, output_fmt="NLC",
        intermediates_only=True, return_prefix_tokens=True,
    )  # fmt: skip
    return torch.cat((patches, prefix), dim=1)


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


def clip_preprocess(image: Image.Image, size: int = CLIP_SIZE) -> torch.Tensor:
    """PIL image -> [3, size, size]: shortest side to `size` (bicubic), centre crop, CLIP mean/std.

    Follows CLIPImageProcessor: the long side becomes int(size * long / short), the crop
    starts at (extent - size) // 2.
    """
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def clip_patch_spans(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int = CLIP_TOKENS
) -> list[list[tuple[int, int]]]:
    """Per sample, the (start, end) rows of each image's patches (the first
    `tokens_per_image - 1` of its placeholder rows; the CLS row, last, is left out).

    Images are consecutive runs of `tokens_per_image` placeholders in ids [B, T] (or [T]).
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    spans: list[list[tuple[int, int]]] = []
    for b, row in enumerate((ids == image_token_id).tolist()):
        found, t = [], 0
        while t < len(row):
            if not row[t]:
                t += 1
                continue
            run = t
            while t < len(row) and row[t]:
                t += 1
            if (t - run) % tokens_per_image:
                raise ValueError(f"sample {b}: {t - run} consecutive image placeholders at {run}, "
                                 f"not a multiple of {tokens_per_image}")  # fmt: skip
            found += [(s, s + tokens_per_image - 1) for s in range(run, t, tokens_per_image)]
        spans.append(found)
    return spans


def load_clip_tower_file(model: nn.Module, path, source: str | None = None) -> None:
    """Loads OpenAI's CLIP ViT-L/14-336 weights (transformers' `pytorch_model.bin` or
    `model.safetensors` of openai/clip-vit-large-patch14-336) into a timm CLIP tower, strictly.

    Only the `vision_model.*` tensors are used; the text tower and projections are skipped.
    """
    from pathlib import Path

    from vrwkv_core.model.released import read_weights_file

    path = Path(path)
    source = source or str(path)
    sd = read_weights_file(path)
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
