"""The recurrent state of an RWKV language model (RWKV-7, and RWKV-6 which has the same shape).

Per layer: the time-mix token shift `att_shift` [B, C] (the last input of the time
mix), the WKV matrix `wkv` [B, H, N, N] in float32 (rows index v, columns k), and
the channel-mix token shift `ffn_shift` [B, C]. Plain lists of tensors, so any
model with these three pieces per layer can use it. Models never modify a state
in place: `forward(..., state=s)` returns a new one and `s` stays valid, which makes
branching (one prompt, several continuations) a matter of `s.clone()` or nothing.

    s = RWKVState.zeros(model, batch=2)
    s2 = RWKVState.cat([s.select([0]), s.select([1])])
    s.save("state.safetensors"); s = RWKVState.load("state.safetensors")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

PARTS = ("att_shift", "wkv", "ffn_shift")


@dataclass
class RWKVState:
    """Per-layer lists: att_shift [B,C], wkv [B,H,N,N] float32, ffn_shift [B,C]."""

    att_shift: list[torch.Tensor]
    wkv: list[torch.Tensor]
    ffn_shift: list[torch.Tensor]

    @classmethod
    def zeros(
        cls,
        model: Any,
        batch: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "RWKVState":
        """An all-zero state for `model` (anything with n_layer, n_embd, head_size and
        parameters); the shifts take the model's dtype unless `dtype` is given."""
        p = next(model.parameters())
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        C, N = model.n_embd, model.head_size
        H = C // N
        L = model.n_layer
        return cls(
            att_shift=[torch.zeros(batch, C, device=device, dtype=dtype) for _ in range(L)],
            wkv=[torch.zeros(batch, H, N, N, device=device, dtype=torch.float32) for _ in range(L)],
            ffn_shift=[torch.zeros(batch, C, device=device, dtype=dtype) for _ in range(L)],
        )

    @property
    def n_layer(self) -> int:
        return len(self.wkv)

    @property
    def batch_size(self) -> int:
        return self.wkv[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.wkv[0].device

    def _map(self, fn) -> "RWKVState":
        return RWKVState(*([fn(t) for t in getattr(self, part)] for part in PARTS))

    def clone(self) -> "RWKVState":
        """A deep copy."""
        return self._map(torch.clone)

    def detach(self) -> "RWKVState":
        """The same values cut from the autograd graph (e.g. between training windows)."""
        return self._map(torch.Tensor.detach)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "RWKVState":
        """Moves to `device`; `dtype` applies to the shifts only (the WKV state stays float32)."""
        out = self._map(lambda t: t.to(device) if device is not None else t)
        if dtype is not None:
            out.att_shift = [t.to(dtype) for t in out.att_shift]
            out.ffn_shift = [t.to(dtype) for t in out.ffn_shift]
        return out

    def select(self, indices: Sequence[int] | torch.Tensor | slice) -> "RWKVState":
        """The batch rows `indices` (a list, a long tensor or a slice), batch dim kept."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long, device=self.device).reshape(-1)
        return self._map(lambda t: t[indices])

    def __getitem__(self, index: int | slice | Sequence[int]) -> "RWKVState":
        """`state[i]` is the one-row state of batch row i (batch dim kept, size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self.select(index)

    @staticmethod
    def cat(states: Sequence["RWKVState"]) -> "RWKVState":
        """Concatenates states along the batch dimension."""
        if not states:
            raise ValueError("RWKVState.cat needs at least one state")
        return RWKVState(
            *([torch.cat([getattr(s, part)[i] for s in states]) for i in range(states[0].n_layer)] for part in PARTS)
        )

    def save(self, path: str | Path) -> None:
        """Writes the state as safetensors (atomically: temp file + rename)."""
        from vrwkv_core.checkpoint.ours import save_state  # the one way into checkpoint/

        save_state(self, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", model: Any = None) -> "RWKVState":
        """Reads a state written by `save` (shapes and dtypes checked; with `model`, also that it fits it)."""
        from vrwkv_core.checkpoint.ours import load_state  # the one way into checkpoint/

        return load_state(path, device, model)
