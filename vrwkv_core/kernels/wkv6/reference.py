"""WKV-6 reference (RWKV-6 "Finch", x060): diagonal data-dependent decay plus a bonus for the current token.

r, log_w, k, v are [B, T, H, N]; u (`time_faaaa`) is [H, N]; state is [B, H, N, N] float32.
Convention (RWKV-LM's and the `rwkv` package's for x060, NOT the RWKV-7 one): per batch
and head, S is N x N indexed S[key, value], i.e. rows index k and columns index v:

    y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1})        (a row vector over value channels)
    S_t = diag(exp(log_w_t)) S_{t-1} + k_t v_t^T

`log_w` is the natural log of the per-step decay, any value in [-inf, 0]. For x060 the
model passes log_w = -exp(z), which is unbounded below: trained models have channels
whose decay exp(-exp(z)) is 0 in float32 (x070's log_w, by contrast, is >= -exp(-0.5)).

The definition every WKV-6 backend must match: a sequential loop, float64 inputs run in
float64 (the ground truth in tests), others in float32. Differentiable through autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vrwkv_core.kernels.common import check_inputs6, work_dtype


def wkv6_reference(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, u: Tensor,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequential WKV-6 (the definition). float64 inputs run in float64, others in float32."""
    check_inputs6(r, log_w, k, v, u, state)
    B, T, H, N = r.shape
    in_dtype, dt = r.dtype, work_dtype(r)
    r, log_w, k, v, u = (x.to(dt) for x in (r, log_w, k, v, u))
    w = log_w.exp()
    S = torch.zeros(B, H, N, N, dtype=dt, device=r.device) if state is None else state.to(dt)
    bonus = u.unsqueeze(-1)  # [H, N(key), 1]
    ys = []
    for t in range(T):
        kv = k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)  # [B, H, N(key), N(value)]
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], S + bonus * kv))
        S = w[:, t].unsqueeze(-1) * S + kv
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return y.to(in_dtype), S
