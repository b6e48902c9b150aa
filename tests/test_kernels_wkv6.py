"""WKV-6 kernels against the float64 sequential reference: outputs, final state, every gradient.

Uninitialised memory is poisoned with NaN (deterministic mode fills every `torch.empty`),
so an element a kernel forgets to write fails the comparison. Decays follow x060:
log_w = -exp(z), unbounded below, including decays that are exactly 0 in float32.
"""

from __future__ import annotations

import pytest
import torch

from vrwkv_core.kernels.wkv6 import wkv6, wkv6_chunked, wkv6_reference

FP32_TOL = 1e-5
# bf16 keeps 8 significant bits (unit roundoff ~2e-3); the kernel computes in fp32, so the
# error is the final rounding to bf16: 1e-2 leaves a margin and still catches real bugs.
BF16_TOL = 1e-2
NAMES = ("y", "state", "d_r", "d_log_w", "d_k", "d_v", "d_u", "d_state0")


pytestmark = pytest.mark.usefixtures("nan_poison")  # unwritten outputs are NaN (conftest)


def make_inputs(B: int, T: int, H: int, N: int, seed: int, with_state: bool = True, z_hi: float = 3.0):
    """float64 inputs (rounded to fp32 values) with x060-like decays z ~ U(-7, z_hi)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shape = (B, T, H, N)
    z = torch.rand(*shape, generator=g, dtype=torch.float64) * (z_hi + 7.0) - 7.0
    xs = [randn(*shape) * 0.5, -torch.exp(z), randn(*shape) * 0.5, randn(*shape), randn(H, N) * 0.5]
    xs.append(randn(B, H, N, N) * 0.3 if with_state else None)
    return [x.float().double() if x is not None else None for x in xs]


def run(fn, inputs, dtype, seed: int = 99):
    """Forward + backward of sum(y * gy) + sum(S * gS): [y, S, every input gradient]."""
    xs = [x.detach().to(dtype).clone().requires_grad_() if x is not None else None for x in inputs]
    y, S = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    ((y * gy).sum() + (S * gs).sum()).backward()
    return [y.detach(), S.detach()] + [x.grad if x is not None else None for x in xs]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(got, want, tol: float) -> None:
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            continue
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = rel(a, b)
        assert err <= tol, f"{name}: norm-wise relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B,H,N", [(2, 2, 16), (1, 3, 64)])
def test_fp32_matches_float64_reference(T, with_state, B, H, N):
    inputs = make_inputs(B, T, H, N, seed=T * 7 + N + with_state, with_state=with_state)
    want = run(wkv6_reference, inputs, torch.float64)
    compare(run(wkv6_chunked, inputs, torch.float32), want, FP32_TOL)
    compare(run(wkv6_reference, inputs, torch.float32), want, FP32_TOL)


def test_extreme_decays_stay_exact():
    """Decays of exactly 0 (log_w = -inf, -exp(40)), ~1 (-1e-6), and a huge step followed by
    tiny ones in the same chunk: a prefix-sum difference would lose those tiny steps."""
    B, T, H, N = 2, 40, 2, 16
    inputs = make_inputs(B, T, H, N, seed=5)
    lw = inputs[1]
    lw[0, 3, 0, :4] = float("-inf")
    lw[1, 7, 1, :4] = -torch.exp(torch.tensor(40.0, dtype=torch.float64))
    lw[0, 17, 1] = -150.0
    lw[0, 18:32, 1] = -0.01
    lw[1, :, 0, 8:] = -1e-6
    want = run(wkv6_reference, inputs, torch.float64)
    got = run(wkv6_chunked, inputs, torch.float32)
    compare(got, want, FP32_TOL)
    # the tiny-decay stretch after the -150 step, head 1 of sample 0, alone
    assert rel(got[0][0, 18:32, 1], want[0][0, 18:32, 1]) <= FP32_TOL


@pytest.mark.parametrize("chunk_len,sub_len", [(8, 2), (16, 16), (32, 8), (1, 1)])
def test_chunk_shapes_agree(chunk_len, sub_len):
    inputs = make_inputs(1, 37, 2, 8, seed=chunk_len + sub_len)
    want = run(wkv6_reference, inputs, torch.float64)
    got = run(lambda *x: wkv6_chunked(*x, chunk_len=chunk_len, sub_len=sub_len), inputs, torch.float32)
    compare(got, want, FP32_TOL)


def test_bf16_inputs():
    inputs = make_inputs(2, 33, 2, 32, seed=3)
    want = run(wkv6_reference, inputs, torch.float64)
    got = run(wkv6, inputs, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    compare(got, want, BF16_TOL)


def test_splitting_the_sequence_carries_the_state():
    """Two calls (state passed on) give the outputs and state of one call."""
    r, lw, k, v, u, _ = make_inputs(1, 50, 2, 16, seed=11, with_state=False)
    y, S = wkv6(r, lw, k, v, u)
    y1, S1 = wkv6(r[:, :23], lw[:, :23], k[:, :23], v[:, :23], u)
    y2, S2 = wkv6(r[:, 23:], lw[:, 23:], k[:, 23:], v[:, 23:], u, S1)
    assert rel(torch.cat((y1, y2), 1), y) < 1e-12 and rel(S2, S) < 1e-12


def test_state_convention_is_key_value():
    """S[key, value]: one step from zero state with k = e_i, v = e_j writes S[i, j] only."""
    B, H, N = 1, 1, 4
    k = torch.zeros(B, 1, H, N)
    v = torch.zeros(B, 1, H, N)
    k[..., 1] = 1.0
    v[..., 3] = 2.0
    for backend in ("reference", "chunked"):
        _, S = wkv6(torch.zeros(B, 1, H, N), torch.zeros(B, 1, H, N), k, v, torch.zeros(H, N), backend=backend)
        expected = torch.zeros(B, H, N, N)
        expected[0, 0, 1, 3] = 2.0
        assert torch.equal(S, expected), backend


def test_bad_arguments():
    r = torch.zeros(1, 3, 2, 4)
    with pytest.raises(ValueError, match="backend"):
        wkv6(r, r, r, r, torch.zeros(2, 4), backend="cuda9")
    with pytest.raises(ValueError, match="u has shape"):
        wkv6(r, r, r, r, torch.zeros(4))
    with pytest.raises(ValueError, match="state has shape"):
        wkv6(r, r, r, r, torch.zeros(2, 4), torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match="sub_len"):
        wkv6_chunked(r, r, r, r, torch.zeros(2, 4), chunk_len=16, sub_len=5)
