"""Input checks shared by the WKV backends (reference, chunked, cuda): one message for one mistake."""

from __future__ import annotations

from collections.abc import Sequence

import torch

NAMES = ("r", "log_w", "k", "v", "a", "b")


def check_inputs(xs: Sequence[torch.Tensor], state: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """ValueError unless `xs` = (r, log_w, k, v, a, b) share one [B, T, H, N] shape and
    state is None or [B, H, N, N]; returns (B, T, H, N)."""
    r = xs[0]
    if r.dim() != 4:
        raise ValueError(f"wkv7: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    for name, x in zip(NAMES[1:], xs[1:]):
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r")
    B, T, H, N = r.shape
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv7: state has shape {tuple(state.shape)}, expected {(B, H, N, N)}")
    return B, T, H, N


def check_inputs6(r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                  state: torch.Tensor | None) -> None:
    """ValueError unless r, log_w, k, v share one [B, T, H, N] shape, u is [H, N] and state
    is None or [B, H, N, N]."""
    if r.dim() != 4:
        raise ValueError(f"wkv6: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    for name, x in (("log_w", log_w), ("k", k), ("v", v)):
        if x.shape != r.shape:
            raise ValueError(f"wkv6: {name} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r")
    B, _, H, N = r.shape
    if tuple(u.shape) != (H, N):
        raise ValueError(f"wkv6: u has shape {tuple(u.shape)}, expected {(H, N)}")
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv6: state has shape {tuple(state.shape)}, expected {(B, H, N, N)}")


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the ground truth in tests); everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
