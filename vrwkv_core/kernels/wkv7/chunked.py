"""Chunk-parallel WKV-7 in plain PyTorch: batched matmuls inside chunks, a short scan across them.

Same function as `reference.py` (per batch and head, S is N x N, rows index v):

    S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T ,   y_t = S_t r_t ,   w_t = exp(log_w_t)

Derivation, for one chunk of L steps t = 1..L with S_0 the state entering it. Let
g_t = sum_{s<=t} log_w_s (per channel, g_0 = 0) and u_t = S_{t-1} a_t. Unrolling,

    S_t = S_0 diag(e^{g_t}) + sum_{s<=t} (u_s b_s^T + v_s k_s^T) diag(e^{g_t - g_s}).

Applying S_{t-1} to a_t and S_t to r_t gives, with U, V, Y the L x N matrices of rows u_t, v_t, y_t,

    U = Mab U + Mak V + A~ S_0^T ,    Y = Mrb U + Mrk V + R~ S_0^T ,
    [Mxy]_{ts} = sum_i x_t[i] y_s[i] e^{G_t[i] - g_s[i]},   A~_t = a_t e^{g_{t-1}},  R~_t = r_t e^{g_t},

where G_t = g_{t-1} and s < t (strictly lower) for x = a, G_t = g_t and s <= t for x = r.
The first equation is a unit lower-triangular system (the WY / UT transform): with
Ainv = (I - Mab)^{-1},

    U = W1 + W2 S_0^T,   W1 = Ainv Mak V,   W2 = Ainv A~,
    Y = Yq + Rq S_0^T,   Yq = (Mrb Ainv Mak + Mrk) V,   Rq = R~ + Mrb Ainv A~,

and the state leaving the chunk is S_L = S_0 diag(e^{g_L}) + [U; V]^T [B^; K^], where
B^, K^ are the rows b_s e^{g_L - g_s}, k_s e^{g_L - g_s}. W1, W2, Yq, Rq hold no S_0 and
are built for all chunks at once as [W1; V; Yq] and [W2; 0; Rq]; the scan over chunks is
then two small matmuls per chunk: [U; V; Y] = [W1; V; Yq] + [W2; 0; Rq] S_0^T, then S_L.

Numerics: float32 throughout (float64 for float64 inputs). Mxy uses relative decays
factored around the chunk midpoint c = g_L / 2 as (x_t e^{G_t - c}) . (y_s e^{c - g_s});
since g_L <= g_t <= 0 both exponents lie in [-|g_L|/2, |g_L|/2], and with
log_w >= -exp(-0.5) a chunk of 16 keeps every factor below e^{4.9} (e^{9.7} for 32).
All other decays are <= 1. Upper-triangle entries are masked before use. Ainv comes
from exact block inversion, doubling the solved diagonal blocks 1 -> 2 -> ... -> L
(log2 L batched matmuls; `solve_triangular` loops over the many tiny CPU systems).
Padding to a multiple of L uses log_w = 0 and zeros elsewhere, which leaves S unchanged.
Gradients come from autograd through this forward; `vrwkv_core.bench.wkv` times it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vrwkv_core.kernels.common import check_inputs

CHUNK_LEN = 16


def unit_lower_inverse(m: torch.Tensor) -> torch.Tensor:
    """(I - m)^{-1} for strictly lower-triangular m [..., L, L], L a power of two.

    Doubles the solved diagonal blocks: [[D0, 0], [X, D1]] with X = D1 m21 D0 inverts
    [[I - m11, 0], [-m21, I - m22]] when D0, D1 invert the diagonal blocks.
    """
    L = m.shape[-1]
    batch = m.shape[:-2]
    D = torch.ones(*batch, L, 1, 1, dtype=m.dtype, device=m.device)  # [..., nblocks, s, s]
    s = 1
    while s < L:
        nb = L // (2 * s)
        blocks = m.reshape(*batch, nb, 2, s, nb, 2, s)[..., :, 1, :, :, 0, :]  # [..., nb, s, nb, s]
        m21 = torch.diagonal(blocks, dim1=-4, dim2=-2).movedim(-1, -3)  # [..., nb, s, s]
        D0, D1 = D[..., 0::2, :, :], D[..., 1::2, :, :]
        X = D1 @ m21 @ D0
        D = torch.cat((F.pad(D0, (0, s)), torch.cat((X, D1), dim=-1)), dim=-2)
        s *= 2
    return D[..., 0, :, :]


def wkv7_chunked(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                 state: Tensor | None = None, *, chunk_len: int = CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """Chunk-parallel WKV-7: inputs [B,T,H,N], state [B,H,N,N] -> (y [B,T,H,N], final state).

    y has the input dtype; the state is float32 (float64 for float64 inputs).
    `chunk_len` must be a power of two (16 or 32 keep the factored decays small).
    """
    B, T, H, N = check_inputs((r, log_w, k, v, a, b), state)
    if chunk_len < 1 or chunk_len & (chunk_len - 1):
        raise ValueError(f"wkv7: chunk_len must be a power of two, got {chunk_len}")
    L, BH = chunk_len, B * H
    in_dtype = r.dtype
    dt = torch.float64 if in_dtype == torch.float64 else torch.float32
    NC = -(-T // L)
    pad = NC * L - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B,T,H,N] -> contiguous [NC, B*H, L, N]
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, NC, L, H, N).permute(1, 0, 3, 2, 4).reshape(NC, BH, L, N)

    r, log_w, k, v, a, b = (chunks(x) for x in (r, log_w, k, v, a, b))

    g = log_w.cumsum(dim=-2)  # inclusive, in [g_L, 0]
    g_last = g[..., -1:, :]
    c = 0.5 * g_last
    e = (g - c).exp()  # e^{g_t - c}
    e_prev = torch.cat(((-c).exp(), e[..., :-1, :]), dim=-2)  # e^{g_{t-1} - c}
    e_inv = (c - g).exp()
    a_c, r_c = a * e_prev, r * e
    bk_c = torch.cat((b * e_inv, k * e_inv), dim=-2)  # [b e^{c - g}; k e^{c - g}]: [NC, BH, 2L, N]
    ec = c.exp()
    a_g, r_g = a_c * ec, r_c * ec  # A~, R~
    bk_end = bk_c * ec  # [B^; K^] (g_L - c = c)

    M_a = a_c @ bk_c.mT  # [Mab | Mak] before masking: [NC, BH, L, 2L]
    M_r = r_c @ bk_c.mT  # [Mrb | Mrk]
    ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
    strict, incl = ~ones.tril(-1), ~ones.tril(0)
    m_ab = M_a[..., :L].masked_fill(strict, 0.0)
    m_ak = M_a[..., L:].masked_fill(strict, 0.0)
    m_rb = M_r[..., :L].masked_fill(incl, 0.0)
    m_rk = M_r[..., L:].masked_fill(incl, 0.0)
    a_inv = unit_lower_inverse(m_ab)
    rb_inv = m_rb @ a_inv
    eye = torch.eye(L, dtype=dt, device=r.device).expand_as(a_inv)
    # S_0-free parts of [U; V; Y] = base + coef S_0^T, i.e. [W1; V; Yq] and [W2; 0; Rq].
    base = torch.cat((a_inv @ m_ak, eye, rb_inv @ m_ak + m_rk), dim=-2) @ v  # [NC, BH, 3L, N]
    coef = torch.cat((torch.cat((a_inv, torch.zeros_like(a_inv)), dim=-2) @ a_g, rb_inv @ a_g + r_g), dim=-2)
    decay = g_last.exp()

    if state is None:
        S = torch.zeros(BH, N, N, dtype=dt, device=r.device)
    else:
        S = state.to(dt).reshape(BH, N, N)
    # Unbind once: indexing inside the loop would make autograd build a full-size zero
    # gradient per chunk.
    bases, coefs, decays, bk_ends = (x.unbind(0) for x in (base, coef, decay, bk_end))
    ys = []
    for i in range(NC):
        uvy = torch.baddbmm(bases[i], coefs[i], S.mT)  # [U; V; Y] of chunk i: [BH, 3L, N]
        ys.append(uvy[:, 2 * L :])
        S = torch.baddbmm(S * decays[i], uvy[:, : 2 * L].mT, bk_ends[i])

    y = torch.stack(ys).view(NC, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, NC * L, H, N)[:, :T]
    return y.to(in_dtype), S.view(B, H, N, N)
