"""The stage runner: checks inputs, builds model and data, trains with Lightning, writes outputs.

    run_stage(load_recipe("recipes/tiny.yaml"), "pretrain")
    run_stage(recipe, "pretrain", resume=True)      # continue from out_dir/last.ckpt

Writes to the stage's out_dir: config.yaml + model.safetensors (the model, loadable alone),
last.ckpt and prev.ckpt (Lightning's resumable checkpoints) with their manifest
checkpoints.json, metrics.csv and loss.png, each atomically, from rank 0 only.

Order matters: the hardware is checked first (a GPU recipe on a CPU machine fails before
anything loads), then the input files, then the checkpoint to resume from (damaged files
are skipped with a warning), then the model is built and compared with the checkpoint's
recipe (changed keys are reported; a changed model is refused). Under DDP Lightning
re-runs the command in one process per extra device; each runs this function.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vrwkv_core.checkpoint import build_from_parts, load_checkpoint
from vrwkv_core.config import recipe_to_dict, stage_devices
from vrwkv_core.data.shapes import prepare_shapes, redraw_if_stale
from vrwkv_core.errors import CheckpointError, DataError, RecipeError
from vrwkv_core.hub import resolve
from vrwkv_core.progress import NULL_PROGRESS, Progress
from vrwkv_core.tokenizer import default_tokenizer
from vrwkv_core.train.callbacks import StageMonitor, format_table
from vrwkv_core.train.checkpoints import LAST, PREV, find_resumable, recipe_drift
from vrwkv_core.train.data import StageData
from vrwkv_core.train.failures import (
    InterruptCatcher,
    interrupted_stop,
    is_out_of_memory,
    out_of_memory_error,
    sigterm_stop,
)
from vrwkv_core.train.module import StageModule, parameter_table
from vrwkv_core.train.outdir import OutDirLock, check_out_dir
from vrwkv_core.train.strategy import is_launch_rank_zero, trainer_hardware
from vrwkv_core.train.tower import pretrain_tower

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
    check_vocab(recipe)
    st = getattr(recipe, stage)
    paths = stage_paths(recipe, stage)
    if recipe.data.synthetic and not paths["root"].exists():
        progress.log(f"preparing the synthetic shapes data in {paths['root']}")
        prepare_shapes(paths["root"])
    elif recipe.data.synthetic and redraw_if_stale(paths["root"]):
        progress.log(f"drew the synthetic shapes data in {paths['root']} again (its captions were an older version's)")
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
        lm = resolve(recipe.model.rwkv.checkpoint)
        if not lm.is_file():
            raise CheckpointError(f"{lm}: model.rwkv.checkpoint not found")
        paths["lm"] = lm
        for tower in recipe.model.vision.towers:
            spec = getattr(recipe.model.vision.checkpoints, tower, None)
            if spec:
                paths[f"tower:{tower}"] = resolve(spec)
    out = Path(st.out_dir)
    if resume and not ((out / LAST).exists() or (out / PREV).exists()):
        raise CheckpointError(f"{out / LAST}: nothing to resume", hint="drop --resume to start fresh")
    return paths


def check_vocab(recipe: Recipe) -> None:
    """model.rwkv.vocab_size must be the tokenizer's (the model classes accept any size, for tests)."""
    want = default_tokenizer().vocab_size
    if recipe.model.rwkv.vocab_size != want:
        raise RecipeError(f"model.rwkv.vocab_size: {recipe.model.rwkv.vocab_size} does not match the tokenizer's "
                          f"{want} ids (the RWKV World vocabulary)", hint=f"set model.rwkv.vocab_size={want}")  # fmt: skip


def build_model(recipe: Recipe, paths: dict[str, Path]) -> VisualRWKV:
    """The previous stage's model (`init_from`), or a new one from its parts (`build_from_parts`:
    the recipe's LM and tower files where it names them, the rest freshly initialised)."""
    if "init" in paths:
        model, _ = load_checkpoint(paths["init"])
        # Loaders return eval mode; Lightning keeps a module's mode, so switch back (frozen
        # towers stay in eval mode: see apply_trainable).
        return model.float().train()
    torch.manual_seed(0)
    return build_from_parts(recipe)


def _quiet_lightning() -> None:
    """Lightning's start-up chatter (GPU/TPU lines, tips) hides our own progress."""
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Frozen towers are in eval mode on purpose (apply_trainable).
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    # StageData (the datamodule) saves and restores the sampler position, not the loader.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def _saved_recipe(path: Path, entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """The resolved recipe a checkpoint was written with (its manifest entry, else the file)."""
    if entry is not None and isinstance(entry.get("recipe"), dict):
        return entry["recipe"]
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                              hint="drop --resume to start fresh") from None  # fmt: skip
    state = ckpt.get("callbacks", {}).get("StageMonitor", {})
    return state.get("recipe") if isinstance(state, dict) else None


def _report_drift(saved: dict[str, Any] | None, recipe: "Recipe", stage: str, progress: Progress) -> None:
    if saved is None:
        progress.log("warning: the checkpoint holds no recipe: changes to the recipe cannot be checked")
        return
    lines = recipe_drift(saved, recipe_to_dict(recipe), stage)
    if lines:
        shown = lines[:12] + ([f"... and {len(lines) - 12} more"] if len(lines) > 12 else [])
        progress.log("warning: the recipe differs from the checkpoint's:\n  " + "\n  ".join(shown))


def run_stage(recipe: "Recipe", stage: str, resume: bool = False, progress: Progress | None = None,
              overwrite: bool = False) -> Path:
    """Runs one stage (`pretrain` or `finetune`) of a recipe and returns its out_dir.

    A fresh run into an out_dir that holds a run needs `overwrite`; the out_dir is locked
    for the run (rank 0 only). Ctrl-C stops at the next step, saves last.ckpt and raises
    TrainingStopped (exit code 130), as SIGTERM does (143).
    """
    import pytorch_lightning as pl


    progress = progress or NULL_PROGRESS
    _quiet_lightning()
    if stage not in STAGES:
        raise RecipeError(f"unknown stage {stage!r}; choose pretrain or finetune")
    check_vocab(recipe)  # before the Trainer: nothing is built for a recipe that cannot train
    st = getattr(recipe, stage)
    out_dir = Path(st.out_dir)
    # first: no GPU is a clear error; `<stage>.devices` overrides hardware.devices
    hw = trainer_hardware(replace(recipe.hardware, devices=stage_devices(recipe, stage)), micro_batch=st.micro_batch)
    monitor = StageMonitor(recipe, stage, out_dir, progress)
    deterministic = recipe.hardware.deterministic
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
        deterministic="warn" if deterministic else None,
    )
    rank_zero = trainer.is_global_zero and is_launch_rank_zero()
    if not rank_zero:  # DDP's extra processes run this too: rank 0 alone reports, checks and locks
        progress = monitor.progress = NULL_PROGRESS
    paths = check_inputs(recipe, stage, resume, progress)
    lock = OutDirLock(out_dir, progress)
    if rank_zero:
        check_out_dir(out_dir, stage, resume, overwrite)
        lock.acquire()
    try:
        return _fit(recipe, stage, resume, progress, trainer, monitor, paths, rank_zero)
    finally:
        lock.release()


def _fit(recipe: "Recipe", stage: str, resume: bool, progress: Progress, trainer: Any, monitor: Any,
         paths: dict[str, Path], rank_zero: bool) -> Path:
    """The part of run_stage that holds the out_dir lock: resume, build, fit, write outputs."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException


    st = getattr(recipe, stage)
    out_dir = Path(st.out_dir)
    ckpt_path: Path | None = None
    if resume:
        ckpt_path, entry, warnings = find_resumable(out_dir)
        for warning in warnings:
            progress.log(f"warning: {warning}")
        monitor.writer.entries = [entry] if entry else []
    pl.seed_everything(st.seed, workers=True, verbose=False)
    model = build_model(recipe, paths)
    # The saved recipe describes the model actually trained (e.g. taken from init_from).
    recipe = replace(recipe, model=model.config) if hasattr(model, "config") else recipe
    if ckpt_path is not None:
        _report_drift(_saved_recipe(ckpt_path, entry), recipe, stage, progress)
    data = StageData(recipe, stage, paths, model.image_processor, model.tokens_per_image,
                     rejects_path=out_dir / "rejects.jsonl" if rank_zero else None)  # fmt: skip
    if st.tower_steps and ckpt_path is None:  # a resumed stage's checkpoint holds the trained tower
        started = time.perf_counter()
        stats = pretrain_tower(model, data.dataset, data.train_idx, st.tower_steps, st.tower_lr, st.micro_batch, st.seed, progress)
        progress.log(f"{stage}: tower pretrained, {st.tower_steps} steps on {int(stats['regions'])} regions: "
                     f"loss {stats['first_loss']:.2f} -> {stats['last_loss']:.2f}, words right "
                     f"{100 * stats['accuracy']:.0f}%, {time.perf_counter() - started:.0f} s")  # fmt: skip
    module = StageModule(model, recipe, stage)
    monitor.recipe = recipe
    if data.dataset.rejects:
        progress.log(f"warning: {len(data.dataset.rejects)} record(s) of {paths['records']} skipped "
                     f"(first: line {data.dataset.rejects[0]['line']}, {data.dataset.rejects[0]['reason']}): "
                     f"see {out_dir / 'rejects.jsonl'}")  # fmt: skip
    progress.log(format_table(parameter_table(model), f"{stage}: parameters"))
    started = time.perf_counter()
    catcher = InterruptCatcher(trainer)
    try:
        with catcher:
            # weights_only=True: our checkpoints hold tensors and plain data only.
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except SIGTERMException:
        if catcher.interrupted:
            raise interrupted_stop(stage, trainer.global_step) from None
        raise sigterm_stop(stage, trainer.global_step) from None
    except SystemExit:
        if catcher.interrupted:  # a second Ctrl-C: Lightning gave up without saving
            raise interrupted_stop(stage, trainer.global_step, saved=False) from None
        raise
    except BaseException as err:
        if is_out_of_memory(err):
            raise out_of_memory_error(recipe, stage, trainer.global_step) from err
        raise
    monitor.finish(trainer, module, started)
    return out_dir
