"""`vrwkv bench wkv`: WKV-7 backends timed side by side in one process, fp32.

The sequential loop (`reference`) against the chunk-parallel form (`chunked`) on the CPU
with `torch.set_num_threads(threads)`, forward alone and forward + backward (the gradient
of a random linear function of y and the final state, to every input and the initial
state). When CUDA is available and `vrwkv_core.kernels.wkv7.cuda` builds, `cuda` rows follow
(timed with synchronisation; their speedup is still over the CPU loop), and `fla` rows
(flash-linear-attention's RWKV-7 chunk kernel) when that package is installed too.

Rows: {"backend", "device", "pass": "fwd" | "fwd+bwd", "ms" (best of `repeats`),
"speedup_vs_reference" (loop ms / this ms, same pass)}.

    python -c "from vrwkv_core.bench.wkv import run_wkv_bench; print(run_wkv_bench())"
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from vrwkv_core.kernels.wkv7 import cuda, fla
from vrwkv_core.kernels.wkv7.chunked import wkv7_chunked
from vrwkv_core.kernels.wkv7.reference import wkv7_reference
from vrwkv_core.progress import Progress


def wkv_inputs(
    B: int, T: int, H: int, N: int, device: str = "cpu", seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Model-like fp32 inputs (a = -kk, b = kk * a_gate, log_w = -e^-0.5 sigmoid(z)) and a state."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g)

    kk = torch.nn.functional.normalize(randn(*shape), dim=-1)
    a_gate = torch.sigmoid(randn(*shape))
    log_w = -math.exp(-0.5) * torch.sigmoid(2 * randn(*shape))
    xs = [randn(*shape) * 0.5, log_w, randn(*shape) * 0.5, randn(*shape), -kk, kk * a_gate]
    state = randn(B, H, N, N) * 0.3
    return [x.to(device) for x in xs], state.to(device)


def _best_ms(fn: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (allocator, JIT build, caches)
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _passes(wkv: Callable, xs: list[torch.Tensor], state: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The two timed closures for one backend: forward only, forward + backward."""
    leaves = [x.clone().requires_grad_() for x in (*xs, state)]
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(xs[0].shape, generator=gen).to(xs[0].device)
    gs = torch.randn(state.shape, generator=gen).to(state.device)

    def fwd() -> None:
        with torch.no_grad():
            wkv(*xs, state)

    def fwd_bwd() -> None:
        y, s = wkv(*leaves[:6], leaves[6])
        torch.autograd.backward((y, s), (gy, gs))
        for x in leaves:
            x.grad = None

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _cuda_backend(N: int) -> Callable | None:
    """The CUDA kernel if torch sees a GPU and it builds for head size N, else None."""
    try:
        if not torch.cuda.is_available():
            return None
        if not cuda.is_available(N):
            return None
        return cuda.wkv7_cuda
    except Exception:  # a missing toolchain or a failed build only drops the CUDA rows
        return None


def run_wkv_bench(
    B: int = 1,
    H: int = 12,
    T: int = 1024,
    N: int = 64,
    threads: int = 2,
    repeats: int = 3,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Times reference vs chunked (and cuda when present), fwd and fwd+bwd; returns rows."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xs, state = wkv_inputs(B, T, H, N)
        backends: list[tuple[str, str, Callable, list[torch.Tensor], torch.Tensor]] = [
            ("reference", "cpu", wkv7_reference, xs, state),
            ("chunked", "cpu", wkv7_chunked, xs, state),
        ]
        cuda_wkv = _cuda_backend(N)
        if cuda_wkv is not None:
            backends.append(("cuda", "cuda", cuda_wkv, [x.cuda() for x in xs], state.cuda()))
        if torch.cuda.is_available() and fla.is_available():
            backends.append(("fla", "cuda", fla.wkv7_fla, [x.cuda() for x in xs], state.cuda()))
        if progress is not None:
            progress.start("bench wkv", total=2 * len(backends))
        rows: list[dict[str, Any]] = []
        reference_ms: dict[str, float] = {}
        for name, device, wkv, bxs, bstate in backends:
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            for pass_name, fn in _passes(wkv, bxs, bstate).items():
                try:
                    ms = _best_ms(fn, repeats, sync)
                except Exception as err:  # only the optional CUDA rows may fail
                    if device != "cuda":
                        raise
                    if progress is not None:
                        progress.log(f"{name} {pass_name} skipped: {err}")
                    continue
                if name == "reference":
                    reference_ms[pass_name] = ms
                rows.append(
                    {
                        "backend": name,
                        "device": device,
                        "pass": pass_name,
                        "ms": round(ms, 2),
                        "speedup_vs_reference": round(reference_ms[pass_name] / ms, 1),
                    }
                )
                if progress is not None:
                    progress.update(backend=name, ms=round(ms, 1))
        return rows
    finally:
        torch.set_num_threads(prev_threads)
        if progress is not None:
            progress.close()
