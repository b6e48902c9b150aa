"""The released VisualRWKV v6.0 file layout (`visualrwkv-v060-*`): key map and config inference.

A v6.0 file (`VisualRWKV-v060-{1B6,3B,7B}-v1.0-20240612.pth`, bf16) is a flat state dict:
`rwkv.*` (an RWKV-6 World LM), `vit.vision_model.*` (CLIP ViT-L/14-336 in transformers-4.x
names) and `proj.weight` (a bias-free Linear, n_embd x 1024). Our model keeps the tower as
`vit.clip_featurizer.*` in timm names; `to_ours` / `to_released` map
between the two (see `towers.py`). Nothing else describes the model, so the config is read
off the tensors: LM dims and LoRA widths from `rwkv.*`, the CLIP grid from its position
embedding (577 = CLS + 24 x 24 at 336 px), 577 image tokens, image position "middle" (the
released finetune and eval). The model is built on the meta device and the file's tensors
assigned (no copy when dtype and device already match: a bf16 file loaded as bf16 stays
memory-mapped); every tensor of the file must be used and every parameter filled.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from vrwkv_core.checkpoint.formats.towers import clip_from_transformers, clip_to_transformers
from vrwkv_core.checkpoint.tensors import check_vocab, lm_part
from vrwkv_core.config import ModelSection, ProjectorSection, VisionSection
from vrwkv_core.errors import CheckpointError
from vrwkv_core.model.families import FAMILIES
from vrwkv_core.model.vision.clip import CLIP_DIM, CLIP_SIZE, CLIP_TOKENS

FAMILY = FAMILIES["x060"]
RELEASED_VIT = "vit.vision_model."

OUR_VIT = "vit.clip_featurizer."

_POS = "vit.vision_model.embeddings.position_embedding.weight"

IGNORED = ("vit.vision_model.embeddings.position_ids",)  # an arange buffer some transformers versions save


def detect(sd: Mapping[str, object]) -> bool:
    """True for a released VisualRWKV v6.0 state dict (RWKV-6 LM + transformers CLIP tower)."""
    return FAMILY.detect(lm_part(sd)) and any(k.startswith(RELEASED_VIT) for k in sd)  # type: ignore[arg-type]


def to_ours(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Released names -> ours: `vit.vision_model.*` -> `vit.clip_featurizer.*` (timm), the rest unchanged."""
    others = [k for k in sd if k.startswith("vit.") and not k.startswith(RELEASED_VIT)]
    if others:
        raise CheckpointError(f"{source}: unexpected vision tensor {others[0]} in a v6.0 (CLIP) checkpoint")
    vit = {k[len("vit."):]: t for k, t in sd.items() if k.startswith(RELEASED_VIT) and k not in IGNORED}
    return _swap_block(sd, "vit.", lambda: {OUR_VIT + k: t for k, t in clip_from_transformers(vit, source).items()})


def _swap_block(sd: Mapping[str, torch.Tensor], prefix: str, block) -> dict[str, torch.Tensor]:
    """sd with its `prefix` tensors replaced by `block()`, placed where the first of them was."""
    out: dict[str, torch.Tensor] = {}
    placed = False
    for k, t in sd.items():
        if not k.startswith(prefix):
            out[k] = t
        elif not placed:
            out.update(block())
            placed = True
    return out


def to_released(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the released v6.0 names (inverse of `released_v6_to_ours`); works on meta tensors."""
    vit = {k[len(OUR_VIT):]: t for k, t in sd.items() if k.startswith(OUR_VIT)}
    return _swap_block(sd, OUR_VIT, lambda: {"vit." + k: t for k, t in clip_to_transformers(vit).items()})


def infer_model_config(
    sd: Mapping[str, torch.Tensor], source: str = "<state dict>", tokens_per_image: int | None = None
) -> tuple[ModelSection, Any]:
    """The ModelSection (and LoRA widths) of a released v6.0 state dict, from its tensors."""
    if "rwkv.emb.weight" not in sd:
        raise CheckpointError(f"{source}: not a VisualRWKV checkpoint (no rwkv.emb.weight)")
    check_vocab(sd["rwkv.emb.weight"].shape[0], source)
    rwkv_cfg, lora = FAMILY.config_from_state_dict(lm_part(sd), source)
    pos = sd.get(_POS)
    if pos is None:
        raise CheckpointError(f"{source}: no {_POS}: not a v6.0 CLIP tower")
    tokens, width = pos.shape
    side = math.isqrt(tokens - 1)
    if (tokens, width) != (CLIP_TOKENS, CLIP_DIM) or side * side != tokens - 1:
        raise CheckpointError(f"{source}: CLIP position embedding {tuple(pos.shape)}; only ViT-L/14-336 "
                              f"({CLIP_TOKENS} x {CLIP_DIM}) is supported")  # fmt: skip
    proj = sd.get("proj.weight")
    if proj is None or tuple(proj.shape) != (rwkv_cfg.n_embd, width):
        got = tuple(proj.shape) if proj is not None else None
        raise CheckpointError(f"{source}: proj.weight is {got}, expected ({rwkv_cfg.n_embd}, {width}) (linear projector)")
    cfg = ModelSection(
        rwkv=rwkv_cfg,
        vision=VisionSection(towers=["clip"], image_size=CLIP_SIZE),
        projector=ProjectorSection(type="linear"),
        tokens_per_image=tokens,
        image_position=FAMILY.image_position,
    )
    return cfg, lora
