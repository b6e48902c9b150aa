"""Vision: the towers (timm), the CLIP tower of v6.0, the image processor and tiling."""

from vrwkv_core.model.vision.processor import ImageProcessor
from vrwkv_core.model.vision.tiling import choose_grid, tile_image
from vrwkv_core.model.vision.towers import (
    TOWERS,
    TowerSpec,
    VisionTowers,
    build_featurizer,
    featurizer_attr,
    tower_input_size,
    tower_spec,
)

__all__ = ["TOWERS", "ImageProcessor", "TowerSpec", "VisionTowers", "build_featurizer", "choose_grid",
           "featurizer_attr", "tile_image", "tower_input_size", "tower_spec"]  # fmt: skip
