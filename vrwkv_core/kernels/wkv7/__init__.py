"""WKV-7: the reference loop (the definition), the chunked PyTorch form, the CUDA kernel.

    y, final_state = wkv7(r, log_w, k, v, a, b, state=None, backend="auto")

All inputs are [B, T, H, N]; `log_w` is the natural log of the per-step decay (each
element in [-exp(-0.5), 0) for RWKV-7); `state` is [B, H, N, N] float32 with rows
indexing v and columns indexing k. Backends: "reference" (sequential loop, the
definition), "chunked" (chunk-parallel plain PyTorch), "cuda" (JIT-built extension of
`cuda_ops/`), "fla" (flash-linear-attention's chunk kernel, optional: `pip install -e '.[fla]'`),
"auto" (cuda for CUDA tensors when it builds, else chunked).
"""

from __future__ import annotations

from torch import Tensor

from vrwkv_core.kernels.wkv7 import cuda
from vrwkv_core.kernels.wkv7.fla import wkv7_fla
from vrwkv_core.kernels.wkv7.chunked import wkv7_chunked
from vrwkv_core.kernels.wkv7.reference import wkv7_reference

BACKENDS = ("auto", "reference", "chunked", "cuda", "fla")


def wkv7(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None,
         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """WKV-7 over a sequence: returns y [B,T,H,N] (input dtype) and the final fp32 state."""
    if backend == "auto":
        backend = "cuda" if r.is_cuda and cuda.is_available(r.shape[-1]) else "chunked"
    if backend == "reference":
        return wkv7_reference(r, log_w, k, v, a, b, state)
    if backend == "chunked":
        return wkv7_chunked(r, log_w, k, v, a, b, state)
    if backend == "cuda":
        return cuda.wkv7_cuda(r, log_w, k, v, a, b, state)
    if backend == "fla":
        return wkv7_fla(r, log_w, k, v, a, b, state)
    raise ValueError(f"unknown WKV backend {backend!r} for WKV-7; choose one of {', '.join(BACKENDS)}")
