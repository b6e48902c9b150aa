"""The released VisualRWKV v7.00 file layout (`visualrwkv-v0700-*`): key map and config inference.

A released file is a flat state dict in half precision: `rwkv.*` (the RWKV-7 LM, the names
of an RWKV-7 World `.pth` behind the prefix), `vit.<tower>_featurizer.*` and `proj.*`. Our
names equal the released ones except SAM's MLP (`mlp.lin1/lin2` released, `mlp.fc1/fc2` in
timm). Nothing else describes the model, so the config is read off the tensors: LM dims and
LoRA widths from `rwkv.*`, towers from the `vit.` prefixes, the image size from the
DINOv2/SigLIP position-embedding grid, the projector type from `proj.gate.weight` (mlp) or
`proj.weight` (linear).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from vrwkv_core.checkpoint.tensors import check_vocab, lm_part
from vrwkv_core.config import ModelSection, ProjectorSection, VisionSection
from vrwkv_core.errors import CheckpointError
from vrwkv_core.model.families import FAMILIES
from vrwkv_core.model.vision import TOWERS

FAMILY = FAMILIES["x070"]
DEFAULT_IMAGE_SIZE = 448
DEFAULT_TOKENS_PER_IMAGE = 1024
RELEASED_TOWERS = ("dino", "siglip", "sam")  # v7.00 concatenation order
IGNORED: tuple[str, ...] = ()  # tensors a released file may hold that the model does not use


_SAM_MLP = re.compile(r"(sam_featurizer\.blocks\.\d+\.mlp\.)(lin|fc)([12]\.)")


def released_to_ours(name: str) -> str:
    """Released VisualRWKV tensor name -> our state-dict name (SAM `mlp.lin1/2` -> `mlp.fc1/2`)."""
    return _SAM_MLP.sub(r"\1fc\3", name)


def ours_to_released(name: str) -> str:
    """Our state-dict name -> the released VisualRWKV name (inverse of `released_to_ours`)."""
    return _SAM_MLP.sub(r"\1lin\3", name)


def detect(sd: Mapping[str, object]) -> bool:
    """True for a released v7.00 state dict (an RWKV-7 LM behind `rwkv.`)."""
    return FAMILY.detect(lm_part(sd))  # type: ignore[arg-type]


def to_ours(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Released names -> ours."""
    return {released_to_ours(k): t for k, t in sd.items()}


def to_released(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the released ones, in the given order; works on meta tensors."""
    return {ours_to_released(k): t for k, t in sd.items()}


def towers_in(sd: Mapping[str, Any], source: str) -> list[str]:
    """Towers present (`vit.<name>_featurizer.*`), in the released concatenation order."""
    found = []
    for name in sd:
        if name.startswith("vit."):
            m = re.match(r"vit\.(\w+?)_featurizer\.", name)
            tower = m.group(1) if m else name.split(".")[1]
            if tower not in found:
                found.append(tower)
    for tower in found:
        if tower in TOWERS and TOWERS[tower].build is not None:  # shaped by the recipe (the tiny tower)
            raise CheckpointError(
                f"{source}: holds a tiny tower, whose shape only its config.yaml records",
                hint="load the model folder (config.yaml + model.safetensors) instead",
            )
        if tower not in TOWERS:
            raise CheckpointError(f"{source}: unknown vision tower {tower!r} (vit.{tower}_featurizer.*)")
    order = [t for t in RELEASED_TOWERS if t in found]
    return order + [t for t in found if t not in order]


def infer_image_size(sd: Mapping[str, torch.Tensor], towers: list[str], source: str) -> int:
    """The square input size of the 448-class towers, from their position-embedding grid."""
    for tower in towers:
        patch = TOWERS[tower].patch if TOWERS[tower].fixed_size is None else None
        pe = sd.get(f"vit.{tower}_featurizer.pos_embed")
        if patch is None or pe is None:
            continue
        n = pe.shape[1]  # timm: DINOv2-reg and SigLIP keep no prefix tokens in pos_embed
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointError(f"{source}: vit.{tower}_featurizer.pos_embed has {n} positions, not a square grid")
        return side * patch
    return DEFAULT_IMAGE_SIZE


def infer_model_config(
    sd: Mapping[str, torch.Tensor], source: str, tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE
) -> tuple[ModelSection, Any]:
    """The ModelSection (and LoRA widths) of a released-layout state dict, from its tensors."""
    if "rwkv.emb.weight" not in sd:
        if "emb.weight" in sd and "blocks.0.att.r_k" in sd:
            raise CheckpointError(
                f"{source}: an RWKV-7 language model, not a VisualRWKV checkpoint",
                hint="load it with RWKV7.from_checkpoint, or start a VisualRWKV from it with model.rwkv.checkpoint in a recipe",
            )
        example = next(iter(sd), None)
        raise CheckpointError(f"{source}: not a VisualRWKV checkpoint (no rwkv.emb.weight; first tensor: {example!r})")
    check_vocab(sd["rwkv.emb.weight"].shape[0], source)
    rwkv_cfg, lora = FAMILY.config_from_state_dict(lm_part(sd), source)
    towers = towers_in(sd, source)
    if not towers:
        raise CheckpointError(f"{source}: no vision tower (vit.<tower>_featurizer.*) in the checkpoint")
    if "proj.gate.weight" in sd:
        projector = "mlp"
    elif "proj.weight" in sd:
        projector = "linear"
    else:
        raise CheckpointError(f"{source}: no projector (neither proj.gate.weight nor proj.weight)")
    cfg = ModelSection(
        rwkv=rwkv_cfg,
        vision=VisionSection(towers=towers, image_size=infer_image_size(sd, towers, source)),
        projector=ProjectorSection(type=projector),
        tokens_per_image=tokens_per_image,
    )
    return cfg, lora
