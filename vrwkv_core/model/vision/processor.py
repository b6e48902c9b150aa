"""The image processor: PIL image -> one normalised tensor per tower (and, with tiling, its views)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from vrwkv_core.model.vision.tiling import tile_image
from vrwkv_core.model.vision.towers import tower_input_size, tower_spec

if TYPE_CHECKING:
    from vrwkv_core.config import VisionSection


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
        image = image.convert("RGB")
        done: dict[tuple, torch.Tensor] = {}
        out = {}
        for name, key in self.towers.items():
            preprocess = tower_spec(name).preprocess
            if preprocess is not None:  # e.g. CLIP: shortest side + centre crop, not a squash
                out[name] = preprocess(image)
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
        return tile_image(image, self.image_size)

    def batch(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Processes several images (already expanded by `views`) into `{tower: [N, 3, S, S]}`."""
        if not images:
            return {name: torch.empty(0, 3, s, s) for name, (s, _, _) in self.towers.items()}
        outs = [self(im) for im in images]
        return {name: torch.stack([o[name] for o in outs]) for name in self.towers}


def _as_array(image: Image.Image):
    return np.array(image, dtype=np.uint8, copy=True)
