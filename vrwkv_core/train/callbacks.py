"""The stage monitor: progress, metrics.csv, loss.png, checkpoints, skipped steps, the model dir.

StageMonitor is the one callback of a stage. Its own checkpoint state (plain data and
tensors, so weights_only loading works) is the resolved recipe, every rank's RNG states
and the non-finite step counters. Only rank 0 writes files.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch

from vrwkv_core.checkpoint import save_pretrained
from vrwkv_core.config import recipe_to_dict
from vrwkv_core.errors import CheckpointError
from vrwkv_core.fsutil import atomic_path, atomic_write_text
from vrwkv_core.progress import NULL_PROGRESS, Progress
from vrwkv_core.train import rng
from vrwkv_core.train.checkpoints import CheckpointWriter
from vrwkv_core.train.failures import non_finite_stop

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe

FIELDS = ["step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"]


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    """A plain-text table (the CLI shows it as is; the core never imports Rich)."""
    cols = list(rows[0]) if rows else []
    cells = [[f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


class StageMonitor(pl.Callback):
    """Reports progress, records metrics, saves last.ckpt every N steps, writes the outputs."""

    def __init__(self, recipe: "Recipe", stage: str, out_dir: Path, progress: Progress) -> None:
        self.recipe = recipe
        self.stage_name = stage
        self.stage = getattr(recipe, stage)
        self.out_dir = out_dir
        self.progress = progress
        self.writer = CheckpointWriter(out_dir)  # the runner gives it the resumed entry
        self.max_bad_steps = self.stage.max_bad_steps
        self.bad_in_row = 0
        self.bad_total = 0
        self.rows: list[dict[str, Any]] = []
        self._last_step = -1
        self._t0 = time.perf_counter()
        self._t_last = self._t0
        self._tokens_last = 0
        self._losses: list[float] = []
        self._rng_saved: list[dict[str, Any]] = []  # every rank's, as the checkpoint holds them
        self._rng_loaded: list[dict[str, Any]] = []
        self._rng_next: dict[str, Any] | None = None  # restored when the next batch starts

    def lightning_loggers(self) -> Any:
        loggers = []
        if self.recipe.logging.tensorboard:
            from pytorch_lightning.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(str(self.out_dir), name="tb"))
        if self.recipe.logging.wandb:
            from pytorch_lightning.loggers import WandbLogger

            loggers.append(WandbLogger(project=self.recipe.logging.wandb, name=f"{self.recipe.name}-{self.stage_name}"))
        return loggers or False

    # -- checkpoint state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"recipe": recipe_to_dict(self.recipe), "rng": self._rng_saved,
                "bad_in_row": self.bad_in_row, "bad_total": self.bad_total}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bad_in_row = int(state_dict.get("bad_in_row", 0))
        self.bad_total = int(state_dict.get("bad_total", 0))
        self._rng_loaded = list(state_dict.get("rng") or [])

    # -- Lightning hooks -------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # After the checkpoint is restored (on_fit_start comes before it).
        if not trainer.is_global_zero:
            self.progress = NULL_PROGRESS
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._load_rows(trainer.global_step)
        self._last_step = trainer.global_step
        if self._rng_loaded:
            rank = trainer.global_rank if len(self._rng_loaded) == trainer.world_size else 0
            self._rng_next = self._rng_loaded[rank]
            self._rng_loaded = []
        if getattr(pl_module, "optimizer_name", ""):
            self.progress.log(f"{self.stage_name}: optimizer {pl_module.optimizer_name}")
        if trainer.global_step:
            self.progress.log(f"{self.stage_name}: resumed at step {trainer.global_step}")
        self.progress.start(f"{self.stage_name}", total=self.stage.max_steps)
        if trainer.global_step:
            self.progress.update(advance=trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._rng_next is not None:
            rng.restore(self._rng_next)
            self._rng_next = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is not None and "loss" in (outputs if isinstance(outputs, dict) else {}):
            self._losses.append(float(outputs["loss"]))
        step = trainer.global_step
        if step == self._last_step:
            return  # still accumulating
        self._last_step = step
        bad = bool(getattr(pl_module, "last_step_bad", False)) or _deepspeed_skipped(trainer)
        pl_module.last_step_bad = False
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        self.bad_total += int(bad)
        now = time.perf_counter()
        tokens = pl_module.tokens_seen
        tps = (tokens - self._tokens_last) / max(now - self._t_last, 1e-9) * trainer.world_size
        self._t_last, self._tokens_last = now, tokens
        loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        self._losses = []
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else 0.0
        self.rows.append({"step": step, "train_loss": round(loss, 6), "val_loss": "", "lr": lr,
                          "tokens_per_s": round(tps, 1), "elapsed_s": round(now - self._t0, 2)})  # fmt: skip
        self.progress.update(advance=1, loss=loss, lr=lr, tok_s=round(tps))
        if bad:
            self.progress.log(f"step {step}: non-finite loss or gradients, step skipped "
                              f"({self.bad_in_row} in a row, {self.bad_total} in all)")  # fmt: skip
            if self.bad_in_row >= self.max_bad_steps:
                in_row, self.bad_in_row = self.bad_in_row, 0  # a resumed run gets a fresh allowance
                self.save_resumable(trainer)
                raise non_finite_stop(self.stage_name, step, in_row)
        if self.stage.save_every_steps and step % self.stage.save_every_steps == 0 and step < self.stage.max_steps:
            self.save_resumable(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        val = trainer.callback_metrics.get("val_loss")
        if val is None or trainer.sanity_checking:
            return
        val = float(val)
        if self.rows and int(self.rows[-1]["step"]) == trainer.global_step:
            self.rows[-1]["val_loss"] = round(val, 6)
        else:
            self.rows.append({"step": trainer.global_step, "train_loss": "", "val_loss": round(val, 6), "lr": "",
                              "tokens_per_s": "", "elapsed_s": round(time.perf_counter() - self._t0, 2)})  # fmt: skip
        self.progress.log(f"step {trainer.global_step}: val_loss {val:.4f}")
        if trainer.is_global_zero:
            self.write_metrics()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        # Lightning raises this between steps, so the state is consistent and worth keeping.
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            self.save_resumable(trainer)

    # -- outputs ---------------------------------------------------------------------
    def save_resumable(self, trainer: pl.Trainer) -> None:
        """last.ckpt (all ranks take part), then metrics.csv and loss.png (rank 0)."""
        self._rng_saved = rng.gather(rng.capture())
        # The next batch starts from the saved state, so a resumed run matches an unbroken one.
        self._rng_next = self._rng_saved[trainer.global_rank if len(self._rng_saved) > 1 else 0]
        self.writer.save(trainer, trainer.global_step, recipe_to_dict(self.recipe))
        if trainer.is_global_zero:
            self.write_metrics()

    def _load_rows(self, step: int) -> None:
        """On resume, keep the metrics of the steps the checkpoint holds (not later ones)."""
        path = self.out_dir / "metrics.csv"
        self.rows = []
        if step and path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= step]

    def write_metrics(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.out_dir / "metrics.csv", buf.getvalue())
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key: str) -> tuple[list[float], list[float]]:
            pts = [(float(r["step"]), float(r[key])) for r in self.rows if r.get(key) not in ("", None)]
            return [p[0] for p in pts], [p[1] for p in pts]

        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("train_loss", "train"), ("val_loss", "validation")):
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if key == "val_loss" else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.recipe.name} {self.stage_name}")
        ax.legend()
        with atomic_path(self.out_dir / "loss.png") as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)

    def finish(self, trainer: pl.Trainer, module: Any, started: float) -> None:
        """After fit: last.ckpt, the model dir (config.yaml + model.safetensors), metrics, plot."""
        self.save_resumable(trainer)
        model = _model_for_saving(trainer, module)  # a collective under ZeRO-3
        if trainer.is_global_zero:
            if getattr(module, "peft", None) is not None:  # adapters / learned state only
                module.peft.save(model, self.out_dir, module.recipe)
            else:
                save_pretrained(model, self.out_dir, module.recipe)
            elapsed = time.perf_counter() - started
            notes = []
            if module.skipped_samples:
                notes.append(f"{module.skipped_samples} samples with bad images skipped")
            if self.bad_total:
                notes.append(f"{self.bad_total} non-finite steps skipped")
            note = f" ({', '.join(notes)})" if notes else ""
            self.progress.log(f"{self.stage_name}: {trainer.global_step} steps in {elapsed / 60:.1f} min{note}")
        trainer.strategy.barrier("vrwkv_finish")


def _deepspeed_skipped(trainer: pl.Trainer) -> bool:
    """DeepSpeed skips a step whose gradients overflow (bf16 check_grad_overflow) on its own."""
    engine = getattr(trainer.strategy, "deepspeed_engine", None) if "DeepSpeed" in type(trainer.strategy).__name__ else None
    return engine is not None and hasattr(engine, "was_step_applied") and not engine.was_step_applied()


class _Weights:
    """Just enough of a module for save_pretrained: a state_dict."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _model_for_saving(trainer: pl.Trainer, module: Any) -> Any:
    """The model whose weights go to model.safetensors. Under DeepSpeed ZeRO-3 the weights are
    sharded across ranks: they are gathered to rank 0 (every rank must call this)."""
    if not getattr(trainer.strategy, "zero_stage_3", False):
        return module.model
    engine = trainer.strategy.deepspeed_engine
    full = engine._zero3_consolidated_16bit_state_dict()  # complete on rank 0 only
    if not trainer.is_global_zero:
        return None
    names = set(module.model.state_dict())
    # The engine wraps the LightningModule, so keys carry a prefix ending in "model.".
    for key in full:
        at = key.find("model.")
        while at != -1:
            if key[at + 6:] in names:
                prefix = key[: at + 6]
                return _Weights({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
            at = key.find("model.", at + 1)
    raise CheckpointError("internal: the gathered ZeRO-3 weights do not match the model's names")
