"""WKV kernels: one signature, several backends (see DESIGN.md, "WKV-7 kernel contract").

    y, final_state = wkv7(r, log_w, k, v, a, b, state=None, backend="auto")

All inputs are [B, T, H, N]; `log_w` is the natural log of the per-step decay (each
element in [-exp(-0.5), 0) for RWKV-7); `state` is [B, H, N, N] float32 with rows
indexing v and columns indexing k. Backends: "reference" (sequential loop, the
definition), "chunked" (chunk-parallel plain PyTorch), "cuda" (JIT-built extension),
"auto" (cuda for CUDA tensors when it builds, else chunked).
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "reference", "chunked", "cuda")


def wkv7(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 over a sequence: returns y [B,T,H,N] (input dtype) and the final fp32 state."""
    if backend == "auto":
        backend = "chunked"
        if r.is_cuda:
            from vrwkv_core.kernels import cuda as _cuda

            if _cuda.is_available(r.shape[-1]):
                backend = "cuda"
    if backend == "reference":
        from vrwkv_core.kernels.reference import wkv7_reference

        return wkv7_reference(r, log_w, k, v, a, b, state)
    if backend == "chunked":
        from vrwkv_core.kernels.chunked import wkv7_chunked

        return wkv7_chunked(r, log_w, k, v, a, b, state)
    if backend == "cuda":
        from vrwkv_core.kernels.cuda import wkv7_cuda

        return wkv7_cuda(r, log_w, k, v, a, b, state)
    raise ValueError(f"unknown WKV backend {backend!r}; choose one of {', '.join(BACKENDS)}")
