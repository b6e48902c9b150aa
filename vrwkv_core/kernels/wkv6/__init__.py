"""WKV-6 (RWKV-6 "Finch"): the reference loop (the definition) and the chunked PyTorch form.

    y, final_state = wkv6(r, log_w, k, v, u, state=None, backend="auto")

r, log_w, k, v are [B, T, H, N]; u (`time_faaaa`) is [H, N]; state is [B, H, N, N] float32
indexed [key, value] (RWKV-LM's x060 convention; see reference.py). Backends: "reference",
"chunked", "auto" (= chunked). There is no CUDA WKV-6 kernel yet: "cuda" is an error.
"""

from __future__ import annotations

from torch import Tensor

from vrwkv_core.kernels.wkv6.chunked import wkv6_chunked
from vrwkv_core.kernels.wkv6.reference import wkv6_reference

BACKENDS = ("auto", "reference", "chunked")


def wkv6(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None,
         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """WKV-6 over a sequence: y [B,T,H,N] (input dtype) and the final state [B,H,N,N] (key, value)."""
    if backend in ("auto", "chunked"):
        return wkv6_chunked(r, log_w, k, v, u, state)
    if backend == "reference":
        return wkv6_reference(r, log_w, k, v, u, state)
    raise ValueError(f"unknown WKV backend {backend!r} for WKV-6; choose one of {', '.join(BACKENDS)}")
