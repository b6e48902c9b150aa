"""The LightningModule of one training stage: freezing, loss, optimizer and LR schedule.

Loss (the released definition): cross-entropy averaged over the labelled tokens of each
sample, then over the samples of the batch: all B of them (`loss_mean: all_samples`, the
original, a sample without labels counting 0) or the labelled ones (`labelled_samples`).
Without L2Wrap the head runs only on labelled positions, so a 2048-token sample with a
20-token answer costs 20 head rows, not 2048, and in vocabulary blocks (`kernels.head_loss`), so
the [rows, vocabulary] logits are never held at once. `L2Wrap` is the original's regulariser
exactly: it leaves the loss value alone and, in backward, adds max_logit * coef / (B*T) at
the argmax logit of every position (image and padding included), so it needs all logits.

A step whose loss or gradients are not finite on any rank is skipped on every rank (the
flag is all-reduced; the gradients are dropped so AdamW leaves weights and moments alone;
under DeepSpeed its own overflow check skips the step); StageMonitor counts such steps.
The optimizer is torch's fused AdamW, or under DeepSpeed its CPU-Adam (with CPU offload)
or FusedAdam, falling back to AdamW when DeepSpeed's ops cannot be built.
VRWKV_TRACE_BATCHES=1 appends "step, exact loss, sample ids" of every micro batch to
out_dir/ranks/rank{r}.txt (a debugging and test aid).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from vrwkv_core.kernels.head_loss import linear_cross_entropy
from vrwkv_core.model.rwkv.layers import Linear
from vrwkv_core.train.branching import branched_hidden
from vrwkv_core.train.peft import setup_peft

if TYPE_CHECKING:
    from vrwkv_core.config import HardwareSection, Recipe, StageSection
    from vrwkv_core.model.visual_rwkv import VisualRWKV

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
TRACE_ENV = "VRWKV_TRACE_BATCHES"


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
    if stage.frozen_layers:
        freeze_layers(model, stage.frozen_layers)
    if hasattr(model.vit, "freeze"):
        # Towers not listed as trainable stay in eval mode (no dropout, fixed norms).
        model.vit.freeze("vision" not in stage.trainable or "vision" in stage.frozen)


def freeze_layers(model: "VisualRWKV", n: int) -> None:
    """The original's freeze_rwkv: n = n_layer freezes the whole LM, else the blocks below n."""
    if n >= len(model.rwkv.blocks):
        model.rwkv.requires_grad_(False)
        return
    for block in model.rwkv.blocks[:n]:
        block.requires_grad_(False)


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


class L2Wrap(torch.autograd.Function):
    """The original's L2Wrap: identity on the loss; backward adds coef * max / (B*T) at each argmax of y."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, y: torch.Tensor, coef: float) -> torch.Tensor:
        ctx.save_for_backward(y)
        ctx.coef = coef
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (y,) = ctx.saved_tensors  # [B, T, V]
        # Not scaled by grad_output: the original adds it as is (no division by accumulation).
        factor = ctx.coef / (y.shape[0] * y.shape[1])
        maxx, ids = torch.max(y, -1, keepdim=True)
        gy = torch.zeros_like(y)
        gy.scatter_(-1, ids, maxx * factor)
        return grad_output, gy, None


def _plain_head(head: torch.nn.Module) -> bool:
    """A bias-free linear head (ours or torch's) whose weight is whole here: adapters and
    quantized heads are other classes, and ZeRO-3 gathers a partitioned weight (`ds_id`) only
    inside forward."""
    return type(head) in (Linear, torch.nn.Linear) and head.bias is None and getattr(head.weight, "ds_id", None) is None


def sequence_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    l2wrap: float = 0.0,
    loss_mean: str = "labelled_samples",
) -> tuple[torch.Tensor, int]:
    """Per-sample mean CE over labelled next tokens, averaged over samples; (loss, n tokens).

    hidden [B, T, C] is the LM's final-norm output; labels [B, T] align with the inputs, so
    position t predicts labels[t + 1]. `loss_mean`: `all_samples` divides by B.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX  # [B, T-1]
    n_tokens = int(valid.sum())
    all_logits = head(hidden) if l2wrap > 0 else None  # [B, T, V], in the model's dtype as the original
    if n_tokens == 0:
        loss = hidden.sum() * 0.0
    else:
        if all_logits is None and _plain_head(head):
            ce = linear_cross_entropy(hidden[:, :-1][valid], head.weight, targets[valid])  # no [rows, V] logits
        else:
            logits = (all_logits[:, :-1][valid] if all_logits is not None else head(hidden[:, :-1][valid])).float()
            ce = F.cross_entropy(logits, targets[valid], reduction="none")
        sample_of = valid.nonzero()[:, 0]
        per_sample = torch.zeros(labels.shape[0], device=ce.device).index_add_(0, sample_of, ce)
        counts = valid.sum(dim=1)
        if loss_mean == "all_samples":
            loss = (per_sample / counts.clamp(min=1)).mean()
        else:
            has = counts > 0
            loss = (per_sample[has] / counts[has]).mean()
    if all_logits is not None:
        loss = L2Wrap.apply(loss, all_logits, l2wrap)
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
        # shared prefixes are a speed option: off where every padded position counts (the
        # original's l2wrap and truncation) and for v6.0's image layout (reversed rows, blanks, left pads)
        fam = model.family
        self.branched = bool(self.stage.shared_prefix) and self.stage.l2wrap == 0 and (
            recipe.data.truncation != "original"
            and not (fam.reverse_image_rows or fam.blank_image_rows or fam.align_images))
        if self.stage.shared_prefix and not self.branched:
            log.info("%s.shared_prefix is off: not with l2wrap, the original's truncation or v6.0 images", stage)
        self.peft = setup_peft(model, recipe, stage)  # adapters or a learned state; None: plain training
        self.strict_loading = self.peft is None  # a peft last.ckpt holds the trainable tensors only
        model.rwkv.grad_checkpoint = recipe.hardware.grad_checkpoint
        self.tokens_seen = 0
        self.skipped_samples = 0
        self.last_step_bad = False  # the last optimizer step was skipped (non-finite)
        self.optimizer_name = ""
        self._loss_bad: torch.Tensor | None = None
        self._trace = os.environ.get(TRACE_ENV, "") not in ("", "0")
        # DeepSpeed owns the gradients (in its own buffers) and skips overflowing steps itself.
        self._deepspeed = recipe.hardware.strategy.startswith("deepspeed")

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if self.branched:
            hidden = branched_hidden(self.model, batch)
        else:
            hidden, _ = self.model(batch["input_ids"], batch.get("images"), batch.get("image_counts"), logits="hidden",
                                   partial_images=bool(batch.get("partial_images")))
        return sequence_loss(hidden, batch["labels"].to(hidden.device), self.model.rwkv.head, self.stage.l2wrap, self.stage.loss_mean)

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every sample of the batch had a bad image and was dropped
            if self.trainer.world_size == 1:
                return None
            # DDP needs a backward on every rank: a zero loss that touches every trainable weight.
            return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), torch.zeros((), device=self.device))
        self.skipped_samples += int(batch.get("n_skipped", 0))
        loss, n_tokens = self(batch)
        bad = ~torch.isfinite(loss.detach())  # stays on the device: no sync per micro batch
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        self.tokens_seen += int(batch["input_ids"].numel())
        if self._trace:
            self._write_trace(batch, loss)
        self.log("train_loss", loss.detach(), prog_bar=False, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """After backward (and DDP's all-reduce), before clipping: skip non-finite steps on all ranks."""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        if self._loss_bad is not None:
            bad = bad | self._loss_bad.to(self.device)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            bad = bad | ~torch.isfinite(torch.nn.utils.get_total_norm(grads).to(self.device))
        flag = bad.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.last_step_bad = bool(flag.item())
        self._loss_bad = None
        if self.last_step_bad and not self._deepspeed:
            for p in self.parameters():
                p.grad = None  # AdamW skips weights without a gradient: no update, no decay, no moments

    def _write_trace(self, batch: dict[str, Any], loss: torch.Tensor) -> None:
        folder = Path(self.stage.out_dir) / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        ids = " ".join(str(i) for i in batch.get("ids") or [])
        with open(folder / f"rank{self.global_rank}.txt", "a", encoding="utf-8") as f:
            f.write(f"{self.global_step + 1}\t{float(loss.detach())!r}\t{ids}\n")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.peft is not None:
            self.peft.filter_checkpoint(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.peft is not None:
            self.peft.check_checkpoint(checkpoint, self)

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
        if self.peft is not None:
            groups = self.peft.param_groups(groups, self.model)
        optimizer, self.optimizer_name = build_optimizer(groups, self.stage, self.recipe.hardware)
        base = self.stage.lr_init
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, self.stage) / base)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_optimizer(groups: list[dict[str, Any]], stage: "StageSection", hw: "HardwareSection") -> tuple[Any, str]:
    """(optimizer, a name for the log): AdamW with betas (0.9, 0.99), eps 1e-8, in the best
    implementation the hardware allows."""
    kw = {"lr": stage.lr_init, "betas": (0.9, 0.99), "eps": 1e-8}
    params = [p for g in groups for p in g["params"]]
    note = ""
    if hw.strategy.startswith("deepspeed"):
        # DeepSpeed moves the weights to the GPU after this runs: decide by the machine.
        try:
            if hw.cpu_offload:
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw), "DeepSpeedCPUAdam"
            if torch.cuda.is_available():
                from deepspeed.ops.adam import FusedAdam

                return FusedAdam(groups, adam_w_mode=True, **kw), "DeepSpeed FusedAdam"
        except Exception as err:  # the ops are JIT-built: no compiler, no CUDA toolkit...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            note = f" (DeepSpeed's Adam could not be built: {first})"
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, fused=fused, **kw), f"torch AdamW{' (fused)' if fused else ''}{note}"
