"""The stage monitor: progress, metrics.csv, loss.png, atomic last.ckpt and the final model dir."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch

from vrwkv_core.progress import Progress

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


def atomic_save_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """trainer.save_checkpoint to a temp file, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(str(tmp), weights_only=False)
    if trainer.is_global_zero and tmp.is_file():
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


class StageMonitor(pl.Callback):
    """Reports progress, records metrics, saves last.ckpt every N steps, writes the outputs."""

    def __init__(self, recipe: "Recipe", stage: str, out_dir: Path, progress: Progress) -> None:
        self.recipe = recipe
        self.stage_name = stage
        self.stage = getattr(recipe, stage)
        self.out_dir = out_dir
        self.progress = progress
        self.rows: list[dict[str, Any]] = []
        self._last_step = -1
        self._t0 = time.perf_counter()
        self._t_last = self._t0
        self._tokens_last = 0
        self._losses: list[float] = []

    def lightning_loggers(self) -> Any:
        loggers = []
        if self.recipe.logging.tensorboard:
            from pytorch_lightning.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(str(self.out_dir), name="tb"))
        if self.recipe.logging.wandb:
            from pytorch_lightning.loggers import WandbLogger

            loggers.append(WandbLogger(project=self.recipe.logging.wandb, name=f"{self.recipe.name}-{self.stage_name}"))
        return loggers or False

    # -- Lightning hooks -------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._load_rows()
        self._last_step = trainer.global_step
        self.progress.start(f"{self.stage_name}", total=self.stage.max_steps)
        if trainer.global_step:
            self.progress.update(advance=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is not None and "loss" in (outputs if isinstance(outputs, dict) else {}):
            self._losses.append(float(outputs["loss"]))
        step = trainer.global_step
        if step == self._last_step:
            return  # still accumulating
        self._last_step = step
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
        if self.stage.save_every_steps and step % self.stage.save_every_steps == 0 and step < self.stage.max_steps:
            self.save_resumable(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        val = trainer.callback_metrics.get("val_loss")
        if val is None or trainer.sanity_checking:
            return
        val = float(val)
        if self.rows and self.rows[-1]["step"] == trainer.global_step:
            self.rows[-1]["val_loss"] = round(val, 6)
        else:
            self.rows.append({"step": trainer.global_step, "train_loss": "", "val_loss": round(val, 6), "lr": "",
                              "tokens_per_s": "", "elapsed_s": round(time.perf_counter() - self._t0, 2)})  # fmt: skip
        self.progress.log(f"step {trainer.global_step}: val_loss {val:.4f}")
        if trainer.is_global_zero:
            self.write_metrics()

    # -- outputs ---------------------------------------------------------------------
    def save_resumable(self, trainer: pl.Trainer) -> None:
        atomic_save_checkpoint(trainer, self.out_dir / "last.ckpt")
        if trainer.is_global_zero:
            self.write_metrics()

    def _load_rows(self) -> None:
        """On resume, keep the metrics of steps already done."""
        path = self.out_dir / "metrics.csv"
        if path.is_file():
            with open(path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def write_metrics(self) -> None:
        from vrwkv_core.data.fsutil import atomic_write_text

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
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
        tmp = self.out_dir / ".loss.png.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.out_dir / "loss.png")

    def finish(self, trainer: pl.Trainer, module: Any, started: float) -> None:
        """After fit: last.ckpt, the model dir (config.yaml + model.safetensors), metrics, plot."""
        from vrwkv_core.model.checkpoint import save_pretrained

        self.save_resumable(trainer)
        if trainer.is_global_zero:
            save_pretrained(module.model, self.out_dir, module.recipe)
            elapsed = time.perf_counter() - started
            skipped = module.skipped_samples
            note = f", {skipped} samples with bad images skipped" if skipped else ""
            self.progress.log(f"{self.stage_name}: {trainer.global_step} steps in {elapsed / 60:.1f} min{note}")
        torch.distributed.barrier() if torch.distributed.is_available() and torch.distributed.is_initialized() else None
