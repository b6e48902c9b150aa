"""The CLIP ViT-L/14-336 vision tower of VisualRWKV v6.0: timm model, features, transform.

Choice: timm's `vit_large_patch14_clip_quickgelu_336` (already a dependency, builds on the
meta device, never downloads with pretrained=False) instead of transformers'
CLIPVisionModel, whose names the released files use. The two compute the same function:
[CLS, patches] + position embedding, pre-LayerNorm (`norm_pre`), 24 pre-norm blocks with
QuickGELU MLPs. The released tensors map onto timm's by the key map
in `checkpoint/formats/towers.py`.

Features (`clip_features`): the last block's output before the final norm, 577 x 1024,
with the CLS row moved from first to LAST: [576 patches row-major, CLS]. `clip_grid_pool` is
v6.0's `grid_pooling` (`model.vision.grid_size`; -1, the released models', pools nothing).
Transform (`clip_preprocess`): RGB, shortest side to 336 (bicubic), centre crop 336,
/255, CLIP mean/std; no pad-to-square. `clip_patch_spans` finds, in ids with image
placeholders, the 576 patch rows of each image: the rows the v6.0 LM reverses in odd layers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vrwkv_core.config import clip_tokens

CLIP_TIMM_NAME = "vit_large_patch14_clip_quickgelu_336"

CLIP_SIZE = 336

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_TOKENS = clip_tokens(-1)  # 24 x 24 patches, then CLS

CLIP_PATCHES = CLIP_TOKENS - 1

CLIP_DIM = 1024


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


def clip_grid_pool(rows: torch.Tensor, grid_size: int) -> torch.Tensor:
    """v6.0's `grid_pooling` of [N, patches + CLS (last), D] -> [N, clip_tokens(grid_size), D].

    -1: unchanged; 0: the CLS row; 1: the patches' mean, then CLS; g: avg_pool2d of the
    patch grid with kernel = stride = side // g (row-major), then CLS. The CLS row stays last.
    """
    if grid_size == -1:
        return rows
    cls = rows[:, -1:]
    if grid_size == 0:
        return cls
    patches = rows[:, :-1]
    if grid_size == 1:
        return torch.cat((patches.mean(dim=1, keepdim=True), cls), dim=1)
    n, length, d = patches.shape
    side = round(length**0.5)
    stride = side // grid_size
    grid = patches.reshape(n, side, side, d).permute(0, 3, 1, 2)  # [N, D, side, side]
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride).permute(0, 2, 3, 1).reshape(n, -1, d)
    return torch.cat((pooled, cls), dim=1)


def clip_preprocess(image: Image.Image, size: int = CLIP_SIZE) -> torch.Tensor:
    """PIL image -> [3, size, size]: shortest side to `size` (bicubic), centre crop, CLIP mean/std.

    Follows CLIPImageProcessor: the long side becomes int(size * long / short), the crop
    starts at (extent - size) // 2.
    """
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
