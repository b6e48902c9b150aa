"""The WKV-7 recurrence as a plain sequential loop: the definition every backend must match.

Per batch and head, with S an N x N matrix whose rows index v and columns index k:

    S_t = S_{t-1} diag(exp(log_w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t

It runs in float64 when given float64 inputs (the ground truth in tests), otherwise in
float32 with the result cast back to the input dtype. Differentiable through autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vrwkv_core.kernels.common import check_inputs


def wkv7_reference(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequential WKV-7: inputs [B,T,H,N], state [B,H,N,N] -> (y [B,T,H,N], final state)."""
    B, T, H, N = check_inputs((r, log_w, k, v, a, b), state)
    in_dtype = r.dtype
    dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
    r, log_w, k, v, a, b = (x.to(dtype) for x in (r, log_w, k, v, a, b))
    w = log_w.exp()
    if state is None:
        S = torch.zeros(B, H, N, N, dtype=dtype, device=r.device)
    else:
        S = state.to(dtype)
    ys = []
    for t in range(T):
        rt, wt, kt, vt, at, bt = (x[:, t] for x in (r, w, k, v, a, b))  # [B, H, N]
        sa = torch.einsum("bhij,bhj->bhi", S, at)  # S a: [B, H, N(v)]
        S = S * wt[:, :, None, :] + sa[..., :, None] * bt[..., None, :] + vt[..., :, None] * kt[..., None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", S, rt))
    y = torch.stack(ys, dim=1)
    return y.to(in_dtype), S
