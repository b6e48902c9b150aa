"""WKV-6 chunk-parallel form in plain PyTorch (differentiable); the definition is reference.py.

Chunked form. In a chunk of L steps entering with S_0 (sums per channel):

    y_t = (r_t e^{a_t}) S_0 + sum_{s<t} [sum_i r_t[i] k_s[i] e^{D_ts[i]}] v_s + (r_t . u k_t) v_t
    S_L = diag(e^{g}) S_0 + sum_s (k_s e^{b_s}) v_s^T

with a_t = sum_{j<t} log_w_j, b_s = sum_{j>s} log_w_j, g = sum_j log_w_j and
D_ts = sum_{s<j<t} log_w_j. Numerics, because log_w is unbounded below:
- No exponent is ever positive and none is a difference of prefix sums. The usual
  factorisation e^{D_ts} = e^{G_{t-1} - c} e^{c - G_s} overflows once a chunk's total
  decay passes ~170 (fp32), and G_{t-1} - G_s cancels: a prefix sum of -150 swallows the
  -0.01 steps after it. Every sum here is taken directly over its own range of
  same-sign terms (a 0/1 mask matrix times log_w), so it is accurate to a few ulps.
- The chunk is split into sub-blocks of l steps. For t in sub-block q (starting at
  position p_q) and s < p_q, e^{D_ts} = e^{sum_{p_q<=j<t}} e^{sum_{s<j<p_q}}: both
  factors are <= 1, so the pair weights of one sub-block's rows are one matmul of scaled
  r against a copy of k scaled for that sub-block's anchor (L/l copies of k per chunk).
  Pairs inside a sub-block get their weights e^{D_ts} explicitly ([l, l, N] per
  sub-block). L = 16, l = 4 keep the extra memory ~12x the input, all of it cheap.
- log_w is clamped at -1000 first, which changes no value even in float64 (e^-1000
  underflows to 0 there too) and keeps -inf out of the 0/1-mask products (0 * -inf).
The scan across chunks is one fused multiply-add per chunk. Padding uses log_w = 0 and
r = k = v = 0, which leaves S unchanged. Gradients come from autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vrwkv_core.kernels.common import check_inputs6, work_dtype

CHUNK_LEN = 16
SUB_LEN = 4
LOG_W_MIN = -1000.0  # e^-1000 is 0 in float64 too: clamping here changes no value


def _masks(L: int, l: int, dt: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The constant 0/1 matrices that turn log_w into the chunk's exponent sums by matmul."""
    i = torch.arange(L, device=device)
    before = i.view(L, 1) > i.view(1, L)  # [t, j]: j < t
    block = i // l
    NB = L // l
    start = torch.arange(NB, device=device).view(NB, 1, 1) * l  # p_q
    s, j = i.view(1, L, 1), i.view(1, 1, L)
    a = torch.arange(l, device=device)
    pair = (a.view(l, 1, 1) > a.view(1, 1, l)) & (a.view(1, 1, l) > a.view(1, l, 1))  # [t, s, j]: s < j < t
    return {
        "a": before.to(dt),  # sum_{j<t}
        "b": before.T.to(dt),  # sum_{j>s}
        "row": (before & (block.view(L, 1) == block.view(1, L))).to(dt),  # sum_{p_q<=j<t}
        "col": ((s < j) & (j < start)).to(dt),  # [q, s, j]: sum_{s<j<p_q}
        "col_keep": (i.view(1, L) < start.view(NB, 1)).to(dt).unsqueeze(-1),  # [q, s, 1]: s < p_q
        "pair": pair.to(dt).view(l * l, l),  # sum_{s<j<t} inside a sub-block
        "strict": (a.view(l, 1) > a.view(1, l)).to(dt).unsqueeze(-1),  # [t, s, 1]: s < t
        "eye": torch.eye(NB, dtype=dt, device=device),
    }


def wkv6_chunked(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None, *,
                 chunk_len: int = CHUNK_LEN, sub_len: int = SUB_LEN) -> tuple[Tensor, Tensor]:
    """Chunk-parallel WKV-6 (the reference's function for any T >= 1, differentiable).

    y has the input dtype; the state is float32 (float64 for float64 inputs).
    `sub_len` must divide `chunk_len`.
    """
    if sub_len < 1 or chunk_len % sub_len:
        raise ValueError(f"wkv6: sub_len {sub_len} must divide chunk_len {chunk_len}")
    check_inputs6(r, log_w, k, v, u, state)
    B, T, H, N = r.shape
    in_dtype, dt = r.dtype, work_dtype(r)
    L, l = chunk_len, sub_len
    NB, NC, BH = L // l, -(-T // L), B * H
    pad = NC * L - T
    m = _masks(L, l, dt, r.device)

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B,T,H,N] -> [NC, B*H, L, N]
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, NC, L, H, N).permute(1, 0, 3, 2, 4).reshape(NC, BH, L, N)

    r_, lw, k_, v_ = (chunks(x) for x in (r, log_w.clamp(min=LOG_W_MIN), k, v))
    uu = u.to(dt).view(1, H, 1, N).expand(B, H, 1, N).reshape(1, BH, 1, 1, N)

    # Rows of sub-block q against every s before it (anchor p_q, both factors <= 1).
    r_row = (r_ * (m["row"] @ lw).exp()).view(NC, BH, NB, l, N)
    k_col = k_.unsqueeze(2) * (torch.einsum("qsj,cbjn->cbqsn", m["col"], lw).exp() * m["col_keep"])
    att = r_row @ k_col.mT  # [NC, BH, NB, l, L]
    # Pairs inside each sub-block, weights explicit; the diagonal is the bonus u.
    rb, kb = r_.view(NC, BH, NB, l, N), k_.view(NC, BH, NB, l, N)
    w_in = (m["pair"] @ lw.view(NC, BH, NB, l, N)).view(NC, BH, NB, l, l, N).exp() * m["strict"]
    inner = torch.einsum("cbqtsn,cbqsn->cbqts", rb.unsqueeze(-2) * w_in, kb)
    inner = inner + torch.diag_embed((rb * uu * kb).sum(-1))
    att = att.view(NC, BH, NB, l, NB, l) + torch.einsum("cbqts,qp->cbqtps", inner, m["eye"])
    y = att.view(NC, BH, L, L) @ v_  # [NC, BH, L, N]

    kv = (k_ * (m["b"] @ lw).exp()).mT @ v_  # [NC, BH, N(key), N(value)]
    decay = lw.sum(-2).exp().unsqueeze(-1)  # [NC, BH, N, 1]
    S = torch.zeros(BH, N, N, dtype=dt, device=r.device) if state is None else state.to(dt).reshape(BH, N, N)
    starts = []
    for kv_c, decay_c in zip(kv.unbind(0), decay.unbind(0)):
        starts.append(S)
        S = torch.addcmul(kv_c, decay_c, S)
    y = y + (r_ * (m["a"] @ lw).exp()) @ torch.stack(starts)
    y = y.view(NC, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, NC * L, H, N)[:, :T]
    return y.to(in_dtype), S.view(B, H, N, N)
