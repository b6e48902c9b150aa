"""Released file layouts, one module per family, registered under the family's name.

Each module holds key maps only: `detect(sd)` (is this state dict that release's layout),
`to_ours` / `to_released` (names, tensors unchanged except CLIP's fused q/k/v),
`infer_model_config(sd, source, tokens_per_image)` (the ModelSection read off the tensors)
and `IGNORED` (tensors such files may carry that the model does not use).
"""

from __future__ import annotations

from types import ModuleType
from typing import Mapping

from vrwkv_core.checkpoint.formats import released_v060, released_v0700
from vrwkv_core.errors import CheckpointError

FORMATS: dict[str, ModuleType] = {"x070": released_v0700, "x060": released_v060}
"""model.rwkv.version -> the key map of that family's released VisualRWKV files."""


def released_format(sd: Mapping[str, object], source: str = "<state dict>") -> ModuleType:
    """The format whose `detect` accepts `sd`; v7.00's when none does (its config inference
    then says what is missing)."""
    for fmt in FORMATS.values():
        if fmt.detect(sd):
            return fmt
    if not sd:
        raise CheckpointError(f"{source}: no tensors")
    return released_v0700


__all__ = ["FORMATS", "released_format"]
