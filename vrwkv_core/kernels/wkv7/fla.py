"""WKV-7 through flash-linear-attention's RWKV-7 chunk kernel (Triton, CUDA only), optional.

`pip install -e '.[fla]'` installs it; `fla` is imported on first use, so vrwkv imports
and runs without it and asking for the backend without it is one clear error.
fla's `chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state)` takes the
same log-decay `w` and the same a = -kk, b = kk * a_gate as our contract; its state is
[B, H, K, V] (rows index k), ours [B, H, V, K], so the states are transposed both ways.
"""

from __future__ import annotations

import importlib
import importlib.util

from torch import Tensor

from vrwkv_core.errors import VrwkvError


def is_available() -> bool:
    """Whether the `fla` package is installed (CUDA is checked per call)."""
    return importlib.util.find_spec("fla") is not None


def _chunk_rwkv7():
    try:
        return importlib.import_module("fla.ops.rwkv7").chunk_rwkv7
    except ImportError as err:
        raise VrwkvError(f"WKV backend 'fla' needs flash-linear-attention ({err})",
                         hint="pip install -e '.[fla]' (a CUDA GPU is needed), or use --wkv-backend auto") from None  # fmt: skip


def wkv7_fla(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
             state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """WKV-7 through fla's chunk kernel: y [B,T,H,N] (input dtype), final state [B,H,N,N] fp32."""
    if not r.is_cuda:
        raise VrwkvError("WKV backend 'fla' runs on CUDA tensors only", hint="use --wkv-backend chunked on CPU")
    chunk = _chunk_rwkv7()
    s0 = state.transpose(-1, -2).contiguous() if state is not None else None
    y, s = chunk(r, log_w.to(r.dtype), k, v, a, b, scale=1.0, initial_state=s0, output_final_state=True)
    return y.to(r.dtype), s.float().transpose(-1, -2).contiguous()
