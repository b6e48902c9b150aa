"""Released VisualRWKV v6.0 `.pth` files: recognise them by their tensors, infer the config, load strictly.

A v6.0 file (`VisualRWKV-v060-{1B6,3B,7B}-v1.0-20240612.pth`, bf16) is a flat state dict:
`rwkv.*` (an RWKV-6 World LM), `vit.vision_model.*` (CLIP ViT-L/14-336 in transformers-4.x
names) and `proj.weight` (a bias-free Linear, n_embd x 1024). Our model keeps the tower as
`vit.clip_featurizer.*` in timm names; `released_v6_to_ours` / `ours_to_released_v6` map
between the two (see `clip.py`). Nothing else describes the model, so the config is read
off the tensors: LM dims and LoRA widths from `rwkv.*`, the CLIP grid from its position
embedding (577 = CLS + 24 x 24 at 336 px), 577 image tokens, image position "middle" (the
released finetune and eval). The model is built on the meta device and the file's tensors
assigned (no copy when dtype and device already match: a bf16 file loaded as bf16 stays
memory-mapped); every tensor of the file must be used and every parameter filled.

    model, recipe = load_released_v6("VisualRWKV-v060-1B6-v1.0-20240612.pth", dtype=torch.bfloat16)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from vrwkv_core.errors import CheckpointError
from vrwkv_core.model.clip import CLIP_DIM, CLIP_SIZE, CLIP_TOKENS, clip_from_transformers, clip_to_transformers

if TYPE_CHECKING:
    from vrwkv_core.config import ModelSection, Recipe
    from vrwkv_core.model.rwkv6 import LoraDims6
    from vrwkv_core.model.visual_rwkv import VisualRWKV

RELEASED_VIT = "vit.vision_model."
OUR_VIT = "vit.clip_featurizer."
_POS = "vit.vision_model.embeddings.position_embedding.weight"
_IGNORED = ("vit.vision_model.embeddings.position_ids",)  # an arange buffer some transformers versions save


def is_released_v6(sd: Mapping[str, object]) -> bool:
    """True for a released VisualRWKV v6.0 state dict (RWKV-6 LM + transformers CLIP tower)."""
    return "rwkv.blocks.0.att.time_faaaa" in sd and any(k.startswith(RELEASED_VIT) for k in sd)


def released_v6_to_ours(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Released names -> ours: `vit.vision_model.*` -> `vit.clip_featurizer.*` (timm), the rest unchanged."""
    others = [k for k in sd if k.startswith("vit.") and not k.startswith(RELEASED_VIT)]
    if others:
        raise CheckpointError(f"{source}: unexpected vision tensor {others[0]} in a v6.0 (CLIP) checkpoint")
    vit = {k[len("vit."):]: t for k, t in sd.items() if k.startswith(RELEASED_VIT) and k not in _IGNORED}
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


def ours_to_released_v6(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the released v6.0 names (inverse of `released_v6_to_ours`); works on meta tensors."""
    vit = {k[len(OUR_VIT):]: t for k, t in sd.items() if k.startswith(OUR_VIT)}
    return _swap_block(sd, OUR_VIT, lambda: {"vit." + k: t for k, t in clip_to_transformers(vit).items()})


def infer_v6_model_config(
    sd: Mapping[str, torch.Tensor], source: str = "<state dict>"
) -> tuple["ModelSection", "LoraDims6"]:
    """The ModelSection (and LoRA widths) of a released v6.0 state dict, from its tensors."""
    from vrwkv_core.config import ModelSection, ProjectorSection, VisionSection
    from vrwkv_core.model.released import check_vocab, lm_part
    from vrwkv_core.model.rwkv6 import config_from_state_dict

    if "rwkv.emb.weight" not in sd:
        raise CheckpointError(f"{source}: not a VisualRWKV checkpoint (no rwkv.emb.weight)")
    check_vocab(sd["rwkv.emb.weight"].shape[0], source)
    rwkv_cfg, lora = config_from_state_dict(lm_part(sd), source)
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
        image_position="middle",
    )
    return cfg, lora


def build_meta_v6(model_cfg: "ModelSection", lora: "LoraDims6 | None" = None) -> "VisualRWKV":
    """A v6.0 VisualRWKV with every weight on the meta device; `lora` overrides the default widths."""
    from vrwkv_core.model.rwkv6 import RWKV6
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    with torch.device("meta"):
        model = VisualRWKV(model_cfg)
        if lora is not None and lora != model.rwkv.lora:
            model.rwkv = RWKV6(model_cfg.rwkv, lora, init=False)
    return model


def released_v6_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """Name -> shape of the released v6.0 file that `model` (built, or on meta) corresponds to."""
    return {k: tuple(t.shape) for k, t in ours_to_released_v6(model.state_dict()).items()}


def from_released_v6_state_dict(
    sd: Mapping[str, torch.Tensor],
    source: str = "<state dict>",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> "VisualRWKV":
    """A VisualRWKV holding exactly the tensors of a released v6.0 state dict (strict).

    dtype None: bfloat16 on CUDA, float32 elsewhere; device "meta" checks names and shapes only.
    """
    from vrwkv_core.model.checkpoint import assign_state
    from vrwkv_core.model.lm_weights import check_names

    model_cfg, lora = infer_v6_model_config(sd, source)
    model = build_meta_v6(model_cfg, lora)
    got = {k: tuple(t.shape) for k, t in sd.items() if k not in _IGNORED}
    check_names(released_v6_shapes(model), got, source)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    assign_state(model, released_v6_to_ours(sd, source), source, device, dtype)
    return model.eval()


def load_released_v6(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple["VisualRWKV", "Recipe"]:
    """Loads a released VisualRWKV v6.0 `.pth` strictly; returns (model in eval mode, a recipe for it)."""
    from vrwkv_core.config import Recipe
    from vrwkv_core.model.released import read_weights_file

    path = Path(path)
    sd = read_weights_file(path)
    if not is_released_v6(sd):
        raise CheckpointError(f"{path}: not a VisualRWKV v6.0 checkpoint "
                              "(no rwkv.*.time_faaaa with a vit.vision_model.* tower)")  # fmt: skip
    model = from_released_v6_state_dict(sd, str(path), device, dtype)
    del sd
    return model, Recipe(name=path.stem, model=model.config)


def released_v6_state_dict(sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Our v6.0 state dict -> the released names and layout, floats cast to `dtype` (for export)."""
    return {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in ours_to_released_v6(sd).items()}
