"""The stage runner: checks inputs, builds model and data, trains with Lightning, writes outputs.

    run_stage(load_recipe("recipes/tiny.yaml"), "pretrain")

Writes to the stage's out_dir: config.yaml + model.safetensors (the model, loadable alone),
last.ckpt (Lightning's resumable checkpoint), metrics.csv and loss.png, each atomically.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vrwkv_core.errors import CheckpointError, DataError, RecipeError
from vrwkv_core.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe
    from vrwkv_core.model.visual_rwkv import VisualRWKV

STAGES = ("pretrain", "finetune")


def stage_paths(recipe: "Recipe", stage: str) -> dict[str, Path]:
    """The files a stage reads: records, image folder (both under data.root)."""
    root = Path(recipe.data.root)
    records = root / (recipe.data.pretrain_file if stage == "pretrain" else recipe.data.finetune_file)
    return {"root": root, "records": records, "images": root / recipe.data.image_folder}


def check_inputs(recipe: "Recipe", stage: str, resume: bool, progress: Progress) -> dict[str, Path]:
    """Checks every file the stage needs before anything is built; prepares shapes if asked."""
    if stage not in STAGES:
        raise RecipeError(f"unknown stage {stage!r}; choose pretrain or finetune")
    st = getattr(recipe, stage)
    paths = stage_paths(recipe, stage)
    if not paths["records"].is_file() and recipe.data.synthetic and not paths["root"].exists():
        from vrwkv_core.data.shapes import prepare_shapes

        progress.log(f"preparing the synthetic shapes data in {paths['root']}")
        prepare_shapes(paths["root"])
    if not paths["records"].is_file():
        key = "data.pretrain_file" if stage == "pretrain" else "data.finetune_file"
        raise DataError(f"{paths['records']}: training records not found ({key} under data.root)",
                        hint="prepare them with `vrwkv prepare-data llava ...` or fix the recipe")
    if not paths["images"].is_dir():
        raise DataError(f"{paths['images']}: image folder not found (data.image_folder under data.root)")
    if st.init_from:
        init = Path(st.init_from)
        if not (init / "model.safetensors").is_file() and not init.is_file():
            hint = "run `vrwkv pretrain` first" if stage == "finetune" else "fix the path in the recipe"
            raise CheckpointError(f"{init}: {stage}.init_from has no model.safetensors", hint=hint)
        paths["init"] = init
    elif recipe.model.rwkv.checkpoint:
        from vrwkv_core.hub import resolve

        lm = resolve(recipe.model.rwkv.checkpoint)
        if not lm.is_file():
            raise CheckpointError(f"{lm}: model.rwkv.checkpoint not found")
        paths["lm"] = lm
        for tower in recipe.model.vision.towers:
            spec = getattr(recipe.model.vision.checkpoints, tower, None)
            if spec:
                paths[f"tower:{tower}"] = resolve(spec)
    if resume and not (Path(st.out_dir) / "last.ckpt").is_file():
        raise CheckpointError(f"{Path(st.out_dir) / 'last.ckpt'}: nothing to resume", hint="drop --resume to start fresh")
    return paths


def build_model(recipe: "Recipe", paths: dict[str, Path]) -> "VisualRWKV":
    """A fresh model, or the previous stage's, with LM and tower weights where the recipe names them."""
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    if "init" in paths:
        init = paths["init"]
        if init.is_dir():
            from vrwkv_core.model.checkpoint import load_pretrained

            model, _ = load_pretrained(init)
        else:
            model = VisualRWKV.from_checkpoint(init)
        return model.float()
    torch.manual_seed(0)
    model = VisualRWKV(recipe.model)
    if "lm" in paths:
        from vrwkv_core.model.rwkv7 import read_weights

        from vrwkv_core.model.checkpoint import load_state_strict

        load_state_strict(model.rwkv, {k: t.float() for k, t in read_weights(paths["lm"]).items()}, str(paths["lm"]))
    for key, path in paths.items():
        if key.startswith("tower:"):
            from vrwkv_core.model.vision import load_tower_file

            load_tower_file(model.vit, key.split(":", 1)[1], path)
    return model


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/validation split of range(n); validation is empty for tiny data or 0."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    n_val = round(n * val_fraction) if n > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n > 1 else 0), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def _quiet_lightning() -> None:
    """Lightning's start-up chatter (GPU/TPU lines, tips) hides our own progress."""
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _trainer_kwargs(recipe: "Recipe") -> dict[str, Any]:
    from vrwkv_core.train.strategy import trainer_hardware

    return trainer_hardware(recipe.hardware)


def run_stage(recipe: "Recipe", stage: str, resume: bool = False, progress: Progress | None = None) -> Path:
    """Runs one stage (`pretrain` or `finetune`) of a recipe and returns its out_dir."""
    import pytorch_lightning as pl

    from vrwkv_core.train.callbacks import StageMonitor, format_table
    from vrwkv_core.train.data import StageData
    from vrwkv_core.train.module import StageModule, parameter_table

    progress = progress or NULL_PROGRESS
    _quiet_lightning()
    paths = check_inputs(recipe, stage, resume, progress)
    st = getattr(recipe, stage)
    out_dir = Path(st.out_dir)
    hw = _trainer_kwargs(recipe)
    pl.seed_everything(st.seed, workers=True, verbose=False)
    model = build_model(recipe, paths)
    # The saved recipe describes the model actually trained (e.g. taken from init_from).
    recipe = replace(recipe, model=model.config) if hasattr(model, "config") else recipe
    module = StageModule(model, recipe, stage)
    progress.log(format_table(parameter_table(model), f"{stage}: parameters"))
    data = StageData(recipe, stage, paths, model.image_processor, model.tokens_per_image)
    monitor = StageMonitor(recipe, stage, out_dir, progress)
    trainer = pl.Trainer(
        **hw,
        max_steps=st.max_steps,
        accumulate_grad_batches=st.grad_accum,
        gradient_clip_val=st.grad_clip or None,
        val_check_interval=(st.val_every_steps * st.grad_accum) if st.val_every_steps > 0 else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if st.val_every_steps > 0 else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=monitor.lightning_loggers(),
        callbacks=[monitor],
        default_root_dir=str(out_dir),
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    started = time.perf_counter()
    # Resume loads with weights_only=True: our checkpoints hold tensors and plain data only.
    trainer.fit(module, datamodule=data, ckpt_path=str(out_dir / "last.ckpt") if resume else None, weights_only=True)
    monitor.finish(trainer, module, started)
    return out_dir
