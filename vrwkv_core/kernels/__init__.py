"""WKV kernels: one signature per op, several backends (see DESIGN.md, "WKV-7 kernel contract").

    y, final_state = wkv7(r, log_w, k, v, a, b, state=None, backend="auto")   # RWKV-7
    y, final_state = wkv6(r, log_w, k, v, u, state=None, backend="auto")      # RWKV-6

Each op lives in its own folder with `reference.py` (the definition, float64-capable),
`chunked.py` (chunk-parallel plain PyTorch, differentiable) and, for WKV-7, `cuda.py`
(the JIT build of the top-level `cuda_ops/` sources). `BACKENDS` are the names a recipe
(`model.rwkv.wkv_backend`) or a `--wkv-backend` flag may pick. `head_loss` holds the LM
head's cross-entropy in vocabulary blocks, which training and `vrwkv bench train` share.
"""

from __future__ import annotations

from vrwkv_core.kernels.wkv6 import wkv6
from vrwkv_core.kernels.wkv7 import BACKENDS, wkv7

__all__ = ["BACKENDS", "wkv6", "wkv7"]
