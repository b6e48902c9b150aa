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

Parameter names are the released checkpoints' (`vit.dino_featurizer.*`, ...); the only
difference is SAM's MLP (`mlp.lin1/lin2` released, `mlp.fc1/fc2` in timm): see
`released_to_ours` / `ours_to_released`. Building never downloads (`pretrained=False`);
`load_tower_file` loads a tower's own weight file through timm's checkpoint filters.

Towers are frozen by default: no grads, and eval mode survives `.train()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vrwkv_core.errors import CheckpointError, RecipeError
from vrwkv_core.model.clip import (
    CLIP_MEAN, CLIP_SIZE, CLIP_STD, CLIP_TIMM_NAME, CLIP_TOKENS, clip_features, clip_preprocess, load_clip_tower_file,
)

if TYPE_CHECKING:
    from PIL import Image

    from vrwkv_core.config import VisionSection

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
SAM_SIZE = 1024
SAM_FOLD = 2


@dataclass(frozen=True)
class TowerSpec:
    """What the processor and the tower container need to know about one tower."""

    timm_name: str | None
    """timm architecture (None: built from `vision.tiny`)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fixed_size: int | None = None
    """Input side when it does not follow `vision.image_size` (SAM: 1024)."""
    penultimate: bool = True
    """Take the second-to-last block without the final norm (else last block + norm)."""


TOWERS: dict[str, TowerSpec] = {
    "dino": TowerSpec("vit_large_patch14_reg4_dinov2", IMAGENET_MEAN, IMAGENET_STD),
    "siglip": TowerSpec("vit_so400m_patch14_siglip_384", HALF, HALF),
    "sam": TowerSpec("samvit_base_patch16", IMAGENET_MEAN, IMAGENET_STD, fixed_size=SAM_SIZE),
    "tiny": TowerSpec(None, HALF, HALF, penultimate=False),
    "clip": TowerSpec(CLIP_TIMM_NAME, CLIP_MEAN, CLIP_STD, fixed_size=CLIP_SIZE, penultimate=False),
    # "clip" (v6.0, CLIP ViT-L/14-336, CLS row last, no pooling) lands with the v6.0 issue.
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


def build_featurizer(name: str, vision_cfg: VisionSection) -> nn.Module:
    """A randomly initialised timm model for one tower (never downloads)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    spec = tower_spec(name)
    size = tower_input_size(name, vision_cfg)
    if name == "tiny":
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
    if name in ("dino", "siglip") and size % 14:
        raise RecipeError(f"model.vision.image_size: {size} is not a multiple of the patch size 14 ({name})")
    return timm.create_model(spec.timm_name, pretrained=False, img_size=size, num_classes=0)


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


def sam_fold(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]; new channel = c*4 + 2*dy + dx (the released order)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // SAM_FOLD, SAM_FOLD, w // SAM_FOLD, SAM_FOLD)  # [B, C, H', dy, W', dx]
    x = x.permute(0, 1, 3, 5, 2, 4)  # [B, C, dy, dx, H', W']
    return x.reshape(b, c * SAM_FOLD * SAM_FOLD, h // SAM_FOLD, w // SAM_FOLD)


def _feature_dim(name: str, model: nn.Module) -> int:
    if name == "sam":
        return model.neck[-2].out_channels * SAM_FOLD * SAM_FOLD
    return model.embed_dim


def _grid_side(name: str, model: nn.Module) -> int:
    if name == "sam":
        return model.patch_embed.grid_size[0] // SAM_FOLD
    return model.patch_embed.grid_size[0]


class VisionTowers(nn.Module):
    """The towers of one config, as `<name>_featurizer` submodules, plus pooling and concat.

    `forward(images)` takes `{tower: [N, 3, S, S]}` and returns `[N, tokens_per_image, embed_dim]`.
    """

    def __init__(self, vision_cfg: VisionSection, tokens_per_image: int) -> None:
        super().__init__()
        self.names = list(vision_cfg.towers)
        if not self.names:
            raise RecipeError("model.vision.towers: needs at least one tower")
        self.side = round(tokens_per_image**0.5)
        if "clip" in self.names:  # v6.0: CLIP alone, 576 patches + CLS, no pooling
            if self.names != ["clip"] or tokens_per_image != CLIP_TOKENS:
                raise RecipeError(f"model.vision.towers: clip goes alone, with tokens_per_image {CLIP_TOKENS}")
        elif self.side * self.side != tokens_per_image:
            raise RecipeError(f"model.tokens_per_image: {tokens_per_image} is not a square number")
        dims = []
        for name in self.names:
            model = build_featurizer(name, vision_cfg)
            grid = _grid_side(name, model)
            if grid < self.side:
                raise RecipeError(
                    f"model.tokens_per_image: {tokens_per_image} is more than the "
                    f"{grid}x{grid} patches of the {name} tower"
                )
            setattr(self, featurizer_attr(name), model)
            dims.append(_feature_dim(name, model))
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
        model = self.featurizer(name)
        if name == "sam":
            return sam_fold(model.forward_features(x))  # neck output [N, 256, 64, 64]
        depth = len(model.blocks)
        index = depth - 2 if TOWERS[name].penultimate else depth - 1
        (grid,) = model.forward_intermediates(
            x, indices=[index], norm=not TOWERS[name].penultimate, stop_early=True,
            output_fmt="NCHW", intermediates_only=True,
        )  # prefix (class/register) tokens are dropped here
        return grid

    def forward(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in images]
        if missing:
            raise ValueError(f"images has no input for tower(s) {missing}; got keys {sorted(images)}")
        counts = {n: images[n].shape[0] for n in self.names}
        if len(set(counts.values())) != 1:
            raise ValueError(f"towers got different image counts: {counts}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.names == ["clip"]:
                p = next(self.featurizer("clip").parameters())
                return clip_features(self.featurizer("clip"), images["clip"].to(device=p.device, dtype=p.dtype))
            feats = []
            for name in self.names:
                p = next(self.featurizer(name).parameters())
                grid = self.tower_grid(name, images[name].to(device=p.device, dtype=p.dtype))
                if grid.shape[-1] != self.side or grid.shape[-2] != self.side:
                    grid = F.adaptive_avg_pool2d(grid, self.side)
                feats.append(grid)
            x = torch.cat(feats, dim=1)  # [N, D, side, side]
        return x.flatten(2).transpose(1, 2)  # [N, side*side (row-major), D]


_SAM_MLP = re.compile(r"(sam_featurizer\.blocks\.\d+\.mlp\.)(lin|fc)([12]\.)")


def released_to_ours(name: str) -> str:
    """Released VisualRWKV tensor name -> our state-dict name (SAM `mlp.lin1/2` -> `mlp.fc1/2`)."""
    return _SAM_MLP.sub(r"\1fc\3", name)


def ours_to_released(name: str) -> str:
    """Our state-dict name -> the released VisualRWKV name (inverse of `released_to_ours`)."""
    return _SAM_MLP.sub(r"\1lin\3", name)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd


def load_tower_file(towers: VisionTowers, name: str, path: str | Path) -> None:
    """Loads one tower from its own weight file (timm, open_clip or SAM layout, any size).

    timm's checkpoint filters strip open_clip's `visual.trunk.`, map SAM's `image_encoder.`
    names and resample position embeddings to this tower's grid.
    """
    from timm.models import vision_transformer, vision_transformer_sam

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {name} tower file not found")
    model = towers.featurizer(name)
    if name == "clip":
        return load_clip_tower_file(model, path)
    filters: dict[str, Callable] = {"sam": vision_transformer_sam.checkpoint_filter_fn}
    state = filters.get(name, vision_transformer.checkpoint_filter_fn)(_read_state_dict(path), model)
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


class ImageProcessor:
    """PIL image -> `{tower: FloatTensor[3, S, S]}` with each tower's resize and normalisation.

    Resize to the tower's square side (bicubic, no crop), scale to [0, 1], normalise with
    the tower's mean/std. Towers with the same size and normalisation share one tensor.
    With `vision.tiling`, `views(image)` gives the global image plus its tiles; each view
    is one image to the model (one `<image>` marker each, see `tiling.py`).
    """

    def __init__(self, vision_cfg: VisionSection) -> None:
        self.image_size = vision_cfg.image_size
        self.tiling = vision_cfg.tiling
        self.towers = {}
        for name in vision_cfg.towers:
            spec = tower_spec(name)
            self.towers[name] = (tower_input_size(name, vision_cfg), spec.mean, spec.std)

    def sizes(self) -> dict[str, int]:
        """Input side per tower."""
        return {name: size for name, (size, _, _) in self.towers.items()}

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        from PIL import Image

        image = image.convert("RGB")
        done: dict[tuple, torch.Tensor] = {}
        out = {}
        for name, key in self.towers.items():
            if name == "clip":  # shortest side + centre crop, not a squash
                out[name] = clip_preprocess(image)
                continue
            if key not in done:
                size, mean, std = key
                pixels = torch.from_numpy(_as_array(image.resize((size, size), Image.BICUBIC)))
                x = pixels.permute(2, 0, 1).float().div_(255.0)
                done[key] = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
            out[name] = done[key]
        return out

    def views(self, image: Image.Image) -> list[Image.Image]:
        """The images one source image becomes: itself, or with tiling its global view + tiles."""
        if not self.tiling:
            return [image]
        from vrwkv_core.model.tiling import tile_image

        return tile_image(image, self.image_size)

    def batch(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Processes several images (already expanded by `views`) into `{tower: [N, 3, S, S]}`."""
        if not images:
            return {name: torch.empty(0, 3, s, s) for name, (s, _, _) in self.towers.items()}
        outs = [self(im) for im in images]
        return {name: torch.stack([o[name] for o in outs]) for name in self.towers}


def _as_array(image: Image.Image):
    import numpy as np

    return np.array(image, dtype=np.uint8, copy=True)
