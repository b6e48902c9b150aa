"""Vision towers (timm) and the image processor that feeds them.

The v7.00 tower set turns one image into 32x32 patch features of 3200 channels:
DINOv2-L/14 reg4 and SigLIP SO400M/14 at 448x448 (raw output of the second-to-last
block, no final norm, patch tokens only), and the SAM ViT-B image encoder at 1024x1024
(neck output 256x64x64 folded 2x2 into channels -> 1024x32x32). Each tower's grid is
adaptive-average-pooled to sqrt(tokens_per_image)^2 and the towers are concatenated per
patch in config order (v7.00: dino, siglip, sam). Pooling per tower before the concat
equals pooling after it (the pool acts per channel) and lets towers with different grids
mix. The `tiny` tower (a small random timm ViT, last block + final norm) goes through the
same path for tests and the CPU recipe.

Each tower is one `TowerSpec` in `TOWERS`: its timm architecture, normalisation, input size,
how its feature grid is read and whether it is pooled. Adding a tower is adding an entry;
nothing else compares tower names. Parameter names are the released checkpoints'
(`vit.dino_featurizer.*`, ...); the key maps (SAM's MLP, CLIP's transformers names) and the
loading of a tower's own weight file live in `vrwkv_core.checkpoint`. Building never
downloads (`pretrained=False`).

Towers are frozen by default: no grads, and eval mode survives `.train()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vrwkv_core.config import VisionSection, clip_tokens
from vrwkv_core.errors import RecipeError
from vrwkv_core.model.vision.clip import (
    CLIP_MEAN,
    CLIP_SIZE,
    CLIP_STD,
    CLIP_TIMM_NAME,
    clip_features,
    clip_grid_pool,
    clip_preprocess,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)

HALF = (0.5, 0.5, 0.5)

SAM_SIZE = 1024

SAM_FOLD = 2


@dataclass(frozen=True)
class TowerSpec:
    """One vision tower: what the processor and the tower container need to know about it."""

    timm_name: str | None
    """timm architecture (None: made by `build`)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fixed_size: int | None = None
    """Input side when it does not follow `vision.image_size` (SAM: 1024, CLIP: 336)."""
    penultimate: bool = True
    """Take the second-to-last block without the final norm (else last block + norm)."""
    patch: int | None = None
    """Patch size the input side must be a multiple of (checked when building)."""
    build: Callable[[VisionSection, int], nn.Module] | None = None
    """Builds the tower for (vision config, input side) instead of `timm.create_model`."""
    fold: int = 1
    """SAM: the neck output is folded fold x fold into channels (see `sam_fold`)."""
    norm_eps: float | None = None
    """LayerNorm eps of the blocks when it is not timm's default (SAM: 1e-6, as Meta's and the original's)."""
    tokens: Callable[[VisionSection], int] | None = None
    """A tower that gives its own token rows (no adaptive pooling) and goes alone: their count for a vision config."""
    preprocess: Callable[[Image.Image], torch.Tensor] | None = None
    """Its own image transform (else: squash-resize to the input side and normalise)."""
    rows: Callable[[nn.Module, torch.Tensor, VisionSection], torch.Tensor] | None = None
    """(model, pixels [N, 3, S, S], vision config) -> token rows [N, tokens, D] for a `tokens` tower."""

    def feature_dim(self, model: nn.Module) -> int:
        """Channels per patch of the tower's output."""
        if self.fold > 1:
            return model.neck[-2].out_channels * self.fold * self.fold
        return model.embed_dim

    def grid_side(self, model: nn.Module) -> int:
        """Side of the tower's output patch grid."""
        return model.patch_embed.grid_size[0] // self.fold

    def grid(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The feature grid [N, D, H, W] of input [N, 3, S, S]."""
        if self.fold > 1:
            return sam_fold(model.forward_features(x), self.fold)  # neck output [N, 256, 64, 64]
        depth = len(model.blocks)
        index = depth - 2 if self.penultimate else depth - 1
        (grid,) = model.forward_intermediates(
            x, indices=[index], norm=not self.penultimate, stop_early=True,
            output_fmt="NCHW", intermediates_only=True,
        )  # prefix (class/register) tokens are dropped here
        return grid


def sam_fold(x: torch.Tensor, fold: int = SAM_FOLD) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]; new channel = c*4 + 2*dy + dx (the released order)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // fold, fold, w // fold, fold)  # [B, C, H', dy, W', dx]
    x = x.permute(0, 1, 3, 5, 2, 4)  # [B, C, dy, dx, H', W']
    return x.reshape(b, c * fold * fold, h // fold, w // fold)


def build_featurizer(name: str, vision_cfg: VisionSection) -> nn.Module:
    """A randomly initialised timm model for one tower (never downloads)."""
    spec = tower_spec(name)
    size = tower_input_size(name, vision_cfg)
    if spec.patch and size % spec.patch:
        raise RecipeError(f"model.vision.image_size: {size} is not a multiple of the patch size {spec.patch} ({name})")
    if spec.build is not None:
        return spec.build(vision_cfg, size)
    import timm

    extra = {"norm_layer": partial(nn.LayerNorm, eps=spec.norm_eps)} if spec.norm_eps is not None else {}
    return timm.create_model(spec.timm_name, pretrained=False, img_size=size, num_classes=0, **extra)


def _build_tiny(vision_cfg: VisionSection, size: int) -> nn.Module:
    """The `tiny` tower: a small random timm ViT shaped by `model.vision.tiny`."""
    from timm.models.vision_transformer import VisionTransformer

    t = vision_cfg.tiny
    if size % t.patch_size:
        raise RecipeError(
            f"model.vision.image_size: {size} is not a multiple of model.vision.tiny.patch_size {t.patch_size}"
        )
    if t.width % t.heads:
        raise RecipeError(f"model.vision.tiny.width: {t.width} is not a multiple of heads {t.heads}")
    if t.stem == "conv" and (t.patch_size < 2 or t.patch_size & (t.patch_size - 1)):
        raise RecipeError(f"model.vision.tiny.patch_size: the conv stem needs a power of 2 (got {t.patch_size})")
    vit = VisionTransformer(
        img_size=size, patch_size=t.patch_size, embed_dim=t.width, depth=t.depth, num_heads=t.heads,
        num_classes=0, class_token=False, global_pool="", fc_norm=False,
    )
    if t.stem == "conv":
        vit.patch_embed.proj = conv_stem(t.width, t.patch_size)
    return vit


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """3x3 stride-2 conv + GroupNorm + GELU per halving of the image (..., C/2, C), then a 1x1 conv.

    Replaces the tiny ViT's one strided patch projection: early convolutions see edges and
    corners inside a patch, which a linear patch embedding trained from scratch learns only
    slowly (Xiao et al. 2021, "Early convolutions help transformers see better").
    """
    n = patch_size.bit_length() - 1  # halvings
    chans = [3] + [max(8, width >> (n - 1 - i)) for i in range(n)]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(chans, chans[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.GroupNorm(min(8, c_out // 4), c_out), nn.GELU()]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], width, 1))


TOWERS: dict[str, TowerSpec] = {
    "dino": TowerSpec("vit_large_patch14_reg4_dinov2", IMAGENET_MEAN, IMAGENET_STD, patch=14),
    "siglip": TowerSpec("vit_so400m_patch14_siglip_384", HALF, HALF, patch=14),
    "sam": TowerSpec("samvit_base_patch16", IMAGENET_MEAN, IMAGENET_STD, fixed_size=SAM_SIZE, fold=SAM_FOLD, norm_eps=1e-6),
    "tiny": TowerSpec(None, HALF, HALF, penultimate=False, build=_build_tiny),
    # v6.0: CLIP ViT-L/14-336, 576 patches + CLS row last, v6.0's grid pooling (none by default), its own crop
    "clip": TowerSpec(CLIP_TIMM_NAME, CLIP_MEAN, CLIP_STD, fixed_size=CLIP_SIZE, penultimate=False,
                      tokens=lambda cfg: clip_tokens(cfg.grid_size), preprocess=clip_preprocess,
                      rows=lambda model, x, cfg: clip_grid_pool(clip_features(model, x), cfg.grid_size)),
}


def tower_spec(name: str) -> TowerSpec:
    """The spec of a tower, or a recipe error for towers we do not build."""
    if name not in TOWERS:
        raise RecipeError(f"model.vision.towers: unknown tower {name!r}; choose from {', '.join(TOWERS)}")
    return TOWERS[name]


def tower_input_size(name: str, vision_cfg: VisionSection) -> int:
    """Square input side of a tower."""
    return tower_spec(name).fixed_size or vision_cfg.image_size


def featurizer_attr(name: str) -> str:
    """Attribute (and state-dict prefix) of a tower inside `VisionTowers`."""
    return f"{name}_featurizer"


class VisionTowers(nn.Module):
    """The towers of one config, as `<name>_featurizer` submodules, plus pooling and concat.

    `forward(images)` takes `{tower: [N, 3, S, S]}` and returns `[N, tokens_per_image, embed_dim]`.
    """

    def __init__(self, vision_cfg: VisionSection, tokens_per_image: int) -> None:
        super().__init__()
        self.names = list(vision_cfg.towers)
        self.vision_cfg = vision_cfg
        if not self.names:
            raise RecipeError("model.vision.towers: needs at least one tower")
        self.side = round(tokens_per_image**0.5)
        alone = [n for n in self.names if TOWERS[n].tokens is not None]  # e.g. v6.0's CLIP: 576 patches + CLS
        if alone:
            want = TOWERS[alone[0]].tokens(vision_cfg)
            if len(self.names) > 1 or tokens_per_image != want:
                raise RecipeError(f"model.vision.towers: {alone[0]} goes alone, with tokens_per_image {want}")
        elif self.side * self.side != tokens_per_image:
            raise RecipeError(f"model.tokens_per_image: {tokens_per_image} is not a square number")
        dims = []
        for name in self.names:
            model = build_featurizer(name, vision_cfg)
            grid = TOWERS[name].grid_side(model)
            if not alone and grid < self.side:
                raise RecipeError(
                    f"model.tokens_per_image: {tokens_per_image} is more than the "
                    f"{grid}x{grid} patches of the {name} tower"
                )
            setattr(self, featurizer_attr(name), model)
            dims.append(TOWERS[name].feature_dim(model))
        self.embed_dim = sum(dims)
        self.frozen = False
        self.freeze(vision_cfg.freeze)

    def featurizer(self, name: str) -> nn.Module:
        """The timm model of one tower."""
        return getattr(self, featurizer_attr(name))

    def freeze(self, frozen: bool = True) -> VisionTowers:
        """Frozen: no grads and eval mode kept through `.train()`. Unfrozen: trainable."""
        self.frozen = frozen
        self.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> VisionTowers:
        super().train(mode)
        if self.frozen:
            for child in self.children():
                child.eval()
        return self

    def tower_grid(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One tower's feature grid [N, D, H, W] for its input [N, 3, S, S]."""
        return TOWERS[name].grid(self.featurizer(name), x)

    def forward(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in images]
        if missing:
            raise ValueError(f"images has no input for tower(s) {missing}; got keys {sorted(images)}")
        counts = {n: images[n].shape[0] for n in self.names}
        if len(set(counts.values())) != 1:
            raise ValueError(f"towers got different image counts: {counts}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if TOWERS[self.names[0]].tokens is not None:  # a tower that gives its own token rows, unpooled
                name = self.names[0]
                p = next(self.featurizer(name).parameters())
                return TOWERS[name].rows(self.featurizer(name), images[name].to(device=p.device, dtype=p.dtype),
                                         self.vision_cfg)
            feats = []
            for name in self.names:
                p = next(self.featurizer(name).parameters())
                grid = self.tower_grid(name, images[name].to(device=p.device, dtype=p.dtype))
                if grid.shape[-1] != self.side or grid.shape[-2] != self.side:
                    grid = F.adaptive_avg_pool2d(grid, self.side)
                feats.append(grid)
            x = torch.cat(feats, dim=1)  # [N, D, side, side]
        return x.flatten(2).transpose(1, 2)  # [N, side*side (row-major), D]
