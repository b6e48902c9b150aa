"""Training: the LightningModule, the stage runner, strategy config.

    from vrwkv_core.train import run_stage
    run_stage(load_recipe("recipes/tiny.yaml"), "pretrain")
"""

from __future__ import annotations

from typing import Any

from vrwkv_core.train.runner import run_stage as _run


def run_stage(*args: Any, **kwargs: Any) -> Any:
    """Runs one stage of a recipe (see vrwkv_core.train.runner.run_stage)."""
    return _run(*args, **kwargs)
