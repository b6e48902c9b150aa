"""WKV-7 kernels against the float64 sequential reference: outputs, final state, every gradient.

Uninitialised memory is poisoned with NaN (torch's deterministic mode fills every
`torch.empty` with NaN), so an element a kernel forgets to write shows up as NaN and fails
the norm-wise comparison and the finiteness check.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vrwkv_core.kernels import wkv7
from vrwkv_core.kernels.wkv7.chunked import wkv7_chunked
from vrwkv_core.kernels.wkv7.reference import wkv7_reference

FP32_TOL = 1e-5
# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). The kernel computes in fp32, so
# the error is the rounding of y and of each gradient to bf16, ~2e-3 norm-wise: 1e-2 leaves
# a 5x margin and still catches any real bug (those give O(1) errors).
BF16_TOL = 1e-2
NAMES = ("y", "state", "d_r", "d_log_w", "d_k", "d_v", "d_a", "d_b", "d_state0")


pytestmark = pytest.mark.usefixtures("nan_poison")  # unwritten outputs are NaN (conftest)


def make_inputs(B: int, T: int, H: int, N: int, seed: int, log_w: float | None = None):
    """Realistic float64 WKV-7 inputs as the model builds them: a = -kk, b = kk * a_gate."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shape = (B, T, H, N)
    r = randn(*shape) * 0.5
    k = randn(*shape) * 0.5
    v = randn(*shape)
    kk = F.normalize(randn(*shape), dim=-1)
    a_gate = torch.sigmoid(randn(*shape))
    if log_w is None:
        lw = -math.exp(-0.5) * torch.sigmoid(randn(*shape) * 2)
    else:
        lw = torch.full(shape, log_w, dtype=torch.float64)
    state = randn(B, H, N, N) * 0.3
    # Round to fp32 so the reference sees exactly what an fp32 kernel sees: the tolerance then
    # measures the kernel's arithmetic, not the conditioning of y to input rounding.
    xs = [x.float().double() for x in (r, lw, k, v, -kk, kk * a_gate)]
    return xs, state.float().double()


def run(fn, xs, state, dtype, gy, gs, **kw):
    """Forward + backward of `fn` on copies of xs/state cast to dtype: y, state and 7 grads."""
    xs = [x.detach().to(dtype).requires_grad_() for x in xs]
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = None if state is None else state.detach().to(state_dtype).requires_grad_()
    y, s = fn(*xs, s0, **kw)
    loss = (y.double() * gy).sum() + (s.double() * gs).sum()
    grads = torch.autograd.grad(loss, xs + ([s0] if s0 is not None else []))
    if s0 is None:
        grads = (*grads, None)
    return y, s, grads


def assert_close(got, ref, tol, names=NAMES):
    for name, g, r in zip(names, got, ref):
        if r is None:
            assert g is None, name
            continue
        assert torch.isfinite(g).all(), f"{name}: non-finite entries"
        if r.norm() == 0:  # e.g. d_log_w at T=1 from a zero state: exactly zero
            assert g.double().norm().item() <= tol, f"{name}: expected zeros"
            continue
        err = ((g.double() - r).norm() / r.norm()).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def reference_and_cotangents(xs, state, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    B, T, H, N = xs[0].shape
    gy = torch.randn(B, T, H, N, generator=gen, dtype=torch.float64)
    gs = torch.randn(B, H, N, N, generator=gen, dtype=torch.float64)
    y, s, grads = run(wkv7_reference, xs, state, torch.float64, gy, gs)
    return [y, s, *grads], gy, gs


# (B, H, N) per length: both B in {1, 2}, H in {1, 3}, N in {64, 16}; the longest sequences use
# small B*H because the float64 reference loop dominates the runtime.
CASES = [
    (T, B, H, N)
    for T, bhs in {
        1: [(1, 1, 64), (2, 3, 16)],
        15: [(2, 3, 64), (1, 1, 16)],
        16: [(1, 3, 64), (2, 1, 16)],
        17: [(2, 1, 64), (1, 3, 16)],
        100: [(1, 3, 64), (2, 3, 16)],
        257: [(1, 1, 64), (2, 1, 16)],
    }.items()
    for B, H, N in bhs
]


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("T,B,H,N", CASES)
def test_chunked_fp32_matches_float64_reference(T, B, H, N, with_state):
    seed = 1000 * T + 100 * B + 10 * H + N + with_state
    xs, state = make_inputs(B, T, H, N, seed)
    state = state if with_state else None
    ref, gy, gs = reference_and_cotangents(xs, state, seed)
    y, s, grads = run(wkv7_chunked, xs, state, torch.float32, gy, gs)
    assert y.dtype == torch.float32 and y.shape == (B, T, H, N)
    assert s.dtype == torch.float32 and s.shape == (B, H, N, N)
    assert_close([y, s, *grads], ref, FP32_TOL)


@pytest.mark.parametrize("chunk_len", [16, 32])
@pytest.mark.parametrize("log_w", [-math.exp(-0.5), -1e-6], ids=["max-decay", "no-decay"])
def test_chunked_extreme_decays(log_w, chunk_len):
    """Strongest decay everywhere (largest factored exponents) and almost no decay."""
    xs, state = make_inputs(1, 40, 1, 64, seed=7, log_w=log_w)
    ref, gy, gs = reference_and_cotangents(xs, state, seed=7)
    got = run(wkv7_chunked, xs, state, torch.float32, gy, gs, chunk_len=chunk_len)
    assert_close([got[0], got[1], *got[2]], ref, FP32_TOL)


def test_chunked_float64_is_exact():
    """In float64 the chunked algebra must agree with the loop to rounding: checks the derivation."""
    xs, state = make_inputs(2, 45, 2, 16, seed=3)
    ref, gy, gs = reference_and_cotangents(xs, state, seed=3)
    y, s, grads = run(wkv7_chunked, xs, state, torch.float64, gy, gs)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
    assert_close([y, s, *grads], ref, 1e-12)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
def test_chunked_bf16_inputs(with_state):
    xs, state = make_inputs(2, 40, 2, 64, seed=11)
    xs = [x.to(torch.bfloat16).double() for x in xs]  # the reference sees exactly the bf16 values
    state = state if with_state else None
    ref, gy, gs = reference_and_cotangents(xs, state, seed=11)
    y, s, grads = run(wkv7_chunked, xs, state, torch.bfloat16, gy, gs)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads[:6])
    assert_close([y, s, *grads], ref, BF16_TOL)


def test_nan_poison_is_active():
    """Guard for the fixture: without it an unwritten output element could pass unnoticed."""
    assert torch.isnan(torch.empty(8)).all()


def test_split_sequence_carries_state():
    xs, state = make_inputs(2, 50, 3, 16, seed=5)
    xs = [x.float() for x in xs]
    y, s = wkv7_chunked(*xs, state.float())
    y1, s1 = wkv7_chunked(*(x[:, :23] for x in xs), state.float())
    y2, s2 = wkv7_chunked(*(x[:, 23:] for x in xs), s1)
    y12 = torch.cat((y1, y2), dim=1)
    assert ((y12 - y).norm() / y.norm()).item() <= FP32_TOL
    assert ((s2 - s).norm() / s.norm()).item() <= FP32_TOL


@pytest.mark.parametrize("backend", ["chunked", "reference", "auto"])
def test_dispatcher_cpu_backends(backend):
    xs, state = make_inputs(1, 33, 2, 16, seed=9)
    y_ref, s_ref = wkv7_reference(*xs, state)
    y, s = wkv7(*(x.float() for x in xs), state.float(), backend=backend)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert_close([y, s], [y_ref, s_ref], FP32_TOL, names=("y", "state"))


def test_dispatcher_auto_uses_chunked_on_cpu():
    xs, _ = make_inputs(1, 20, 1, 16, seed=4)
    xs = [x.float() for x in xs]
    assert torch.equal(wkv7(*xs, backend="auto")[0], wkv7_chunked(*xs)[0])


def test_dispatcher_unknown_backend():
    xs, _ = make_inputs(1, 2, 1, 16, seed=2)
    with pytest.raises(ValueError, match="unknown WKV backend 'triton'"):
        wkv7(*xs, backend="triton")


@pytest.mark.parametrize("fn", [wkv7_chunked, wkv7_reference])
def test_backends_reject_mismatched_shapes(fn):
    xs, state = make_inputs(1, 4, 2, 16, seed=1)
    with pytest.raises(ValueError, match="wkv7: k has shape"):
        fn(xs[0], xs[1], xs[2][:, :3], *xs[3:])
    with pytest.raises(ValueError, match="wkv7: state has shape"):
        fn(*xs, state[:, :1])
    with pytest.raises(ValueError, match=r"wkv7: r must be \[B, T, H, N\]"):
        fn(*(x[0] for x in xs))


def test_wkv_bench_rows():
    from vrwkv_core.bench.wkv import run_wkv_bench

    threads = torch.get_num_threads()
    rows = run_wkv_bench(B=1, H=2, T=40, N=16, threads=1, repeats=1)
    assert torch.get_num_threads() == threads
    cpu = [(r["backend"], r["pass"]) for r in rows if r["device"] == "cpu"]
    assert cpu == [("reference", "fwd"), ("reference", "fwd+bwd"), ("chunked", "fwd"), ("chunked", "fwd+bwd")]
    assert all(r["ms"] > 0 and r["speedup_vs_reference"] > 0 for r in rows)
    assert rows[0]["speedup_vs_reference"] == 1.0
