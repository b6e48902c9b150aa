"""Training: the LightningModule, the stage runner, strategy config (see run_stage)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vrwkv_core.errors import NotImplementedYet

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe
    from vrwkv_core.progress import Progress


def run_stage(recipe: "Recipe", stage: str, resume: bool = False, progress: "Progress | None" = None) -> Path:
    """Runs one stage (`pretrain` or `finetune`) of a recipe and returns its out_dir."""
    raise NotImplementedYet(f"vrwkv {stage}: training is not implemented yet", hint="see issue 'Training' in the tracker")
