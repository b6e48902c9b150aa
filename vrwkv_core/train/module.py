"""The LightningModule of one training stage: freezing, loss, optimizer and LR schedule.

Loss (the released definition): cross-entropy averaged over the labelled tokens of each
sample, then over the samples of the batch. The head runs only on labelled positions, so
a 2048-token sample with a 20-token answer costs 20 head rows, not 2048. The optional
logit regulariser is RWKV training's "L2Wrap": it adds coef * mean(max_logit^2) / 2, whose
gradient pushes each position's largest logit towards 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe, StageSection
    from vrwkv_core.model.visual_rwkv import VisualRWKV

IGNORE_INDEX = -100


def _part_modules(model: "VisualRWKV", part: str) -> list[torch.nn.Module]:
    return {
        "projector": [model.proj],
        "vision": [model.vit],
        "rwkv": [model.rwkv],
        "rwkv.emb": [model.rwkv.emb],
        "rwkv.head": [model.rwkv.head],
    }[part]


def apply_trainable(model: "VisualRWKV", stage: "StageSection") -> None:
    """Freezes everything, unfreezes `stage.trainable`, then re-freezes `stage.frozen`."""
    model.requires_grad_(False)
    for part in stage.trainable:
        for module in _part_modules(model, part):
            module.requires_grad_(True)
    for part in stage.frozen:
        for module in _part_modules(model, part):
            module.requires_grad_(False)
    if hasattr(model.vit, "freeze"):
        # Towers not listed as trainable stay in eval mode (no dropout, fixed norms).
        model.vit.freeze("vision" not in stage.trainable or "vision" in stage.frozen)


def parameter_table(model: "VisualRWKV") -> list[dict[str, Any]]:
    """Rows of (part, total params, trainable params) for the table printed before training."""
    rows = []
    for part, module in (("vision", model.vit), ("projector", model.proj), ("rwkv", model.rwkv)):
        total = sum(p.numel() for p in module.parameters())
        train = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append({"part": part, "params": total, "trainable": train})
    rows.append({"part": "total", "params": sum(r["params"] for r in rows), "trainable": sum(r["trainable"] for r in rows)})
    return rows


def lr_at(step: int, stage: "StageSection") -> float:
    """Linear warmup to lr_init, then cosine decay to lr_final at max_steps."""
    if stage.warmup_steps > 0 and step < stage.warmup_steps:
        return stage.lr_init * (step + 1) / stage.warmup_steps
    span = max(1, stage.max_steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    return stage.lr_final + 0.5 * (stage.lr_init - stage.lr_final) * (1 + math.cos(math.pi * progress))


def sequence_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, logit_l2: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Per-sample mean CE over labelled next tokens, averaged over samples; (loss, n tokens).

    hidden [B, T, C] is the LM's final-norm output; labels [B, T] align with the inputs, so
    position t predicts labels[t + 1].
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX  # [B, T-1]
    n_tokens = int(valid.sum())
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0
    rows = hidden[:, :-1][valid]  # [n, C]
    logits = head(rows).float()
    ce = F.cross_entropy(logits, targets[valid], reduction="none")
    sample_of = valid.nonzero()[:, 0]
    per_sample = torch.zeros(labels.shape[0], device=ce.device).index_add_(0, sample_of, ce)
    counts = valid.sum(dim=1)
    has = counts > 0
    loss = (per_sample[has] / counts[has]).mean()
    if logit_l2 > 0:
        loss = loss + logit_l2 * 0.5 * logits.max(dim=-1).values.pow(2).mean()
    return loss, n_tokens


class StageModule(pl.LightningModule):
    """Trains a VisualRWKV for one stage of a recipe."""

    def __init__(self, model: "VisualRWKV", recipe: "Recipe", stage: str) -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.stage_name = stage
        self.stage: StageSection = getattr(recipe, stage)
        apply_trainable(model, self.stage)
        model.rwkv.grad_checkpoint = recipe.hardware.grad_checkpoint
        self.tokens_seen = 0
        self.skipped_samples = 0

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        hidden, _ = self.model(batch["input_ids"], batch.get("images"), batch.get("image_counts"), logits="hidden")
        return sequence_loss(hidden, batch["labels"].to(hidden.device), self.model.rwkv.head, self.stage.logit_l2)

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every sample of the batch had a bad image and was dropped
            return None
        self.skipped_samples += int(batch.get("n_skipped", 0))
        loss, n_tokens = self(batch)
        self.tokens_seen += int(batch["input_ids"].numel())
        self.log("train_loss", loss.detach(), prog_bar=False, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return
        loss, _ = self(batch)
        self.log("val_loss", loss.detach(), batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # Weight decay on matrices only (not on vectors, norms, embeddings' neighbours).
            (decay if p.ndim >= 2 and not name.endswith("emb.weight") else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=self.stage.lr_init, betas=(0.9, 0.99), eps=1e-8)
        base = self.stage.lr_init
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, self.stage) / base)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
