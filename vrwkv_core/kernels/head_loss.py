"""Cross-entropy of the LM head without the [rows, vocabulary] logits in memory.

`F.cross_entropy(hidden @ weight.T, targets)` on a 65,536-word vocabulary writes, reads and
differentiates a [rows, 65,536] float tensor several times (logits, log-softmax, its
gradient): for the tiny recipe's 256 labelled rows that is 64 MB a pass and about a quarter
of a CPU training step. `linear_cross_entropy` walks the vocabulary in column blocks instead:
the forward keeps only each row's running log-sum-exp, the backward recomputes a block's
logits and turns them into that block's gradients at once, so the working set is one block
(it stays in cache) and no full-vocabulary tensor besides the weight's gradient is made.
Same values and gradients as the plain form up to float rounding (tested); the idea is the
"cut cross-entropy" of Wijmans et al. 2024, here in plain torch ops for any device.

    ce = linear_cross_entropy(hidden, head.weight, targets)   # [N], one loss per row
"""

from __future__ import annotations

from typing import Any

import torch

# logits per block: on a CPU 2 MB of fp32, which stay in cache (256 rows x 65,536 words, 2
# threads: 157 ms for forward and backward against 200 ms unblocked; 8 MB blocks: 180 ms); on
# an accelerator larger blocks, fewer launches
CPU_BLOCK_ELEMENTS = 1 << 19
DEVICE_BLOCK_ELEMENTS = 1 << 24


def _block_columns(rows: int, vocab: int, device: torch.device) -> int:
    elements = CPU_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    return max(1024, min(vocab, elements // max(rows, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        N, V = hidden.shape[0], weight.shape[0]
        step = _block_columns(N, V, hidden.device)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lse = hidden.new_full((N,), float("-inf"), dtype=acc)
        for lo in range(0, V, step):
            block = (hidden @ weight[lo : lo + step].T).to(acc)  # logits in the model's dtype, then fp32 (as head(x).float())
            lse = torch.logaddexp(lse, torch.logsumexp(block, dim=1))
        target_logit = (hidden.to(acc) * weight[targets].to(acc)).sum(dim=1)  # summed in fp32, not bf16
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.step = step
        return lse - target_logit

    @staticmethod
    def backward(ctx: Any, grad_ce: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_ce.to(lse.dtype)  # fp32 (fp64 for fp64 inputs)
        grad_h = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        # d ce / d logit_j = softmax_j - [j == target]: the softmax part block by block ...
        for lo in range(0, weight.shape[0], ctx.step):
            w = weight[lo : lo + ctx.step]
            p = torch.exp((hidden @ w.T).to(lse.dtype) - lse[:, None]).mul_(g[:, None]).to(hidden.dtype)
            if need_h:
                if p.dtype == grad_h.dtype:
                    grad_h.addmm_(p, w)
                else:  # bf16/fp16 products as the plain head's backward, summed over blocks in fp32
                    grad_h += (p @ w).to(grad_h.dtype)
            if need_w:
                torch.mm(p.T, hidden, out=grad_w[lo : lo + ctx.step])
        # ... and the target part once
        gt = g.to(hidden.dtype)[:, None]
        if need_h:
            grad_h.sub_((weight[targets] * gt).to(grad_h.dtype))
            grad_h = grad_h.to(hidden.dtype)
        if need_w:
            grad_w.index_add_(0, targets, -(hidden * gt))
        return grad_h, grad_w, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy [N] of the logits `hidden @ weight.T` ([N, C] x [V, C]) against
    `targets` [N] (all valid ids), computed in vocabulary blocks (see the module docstring)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # mixed precision: the products in the autocast dtype, as head(hidden) would be; cast
        # here because autocast is off in backward, where fp32 and bf16 operands would meet
        dt = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dt), weight.to(dt)
    return _LinearCrossEntropy.apply(hidden, weight, targets)


__all__ = ["linear_cross_entropy"]
