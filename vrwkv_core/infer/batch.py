"""A decoding batch whose rows join and leave between steps (continuous batching over RNN rows).

`generate_many` batches a fixed list of prompts under one sampling config; a server needs
rows that arrive at any time, each with its own config. `DecodeBatch` holds only the
shared part: the per-row logits and RNN states concatenated on the batch dimension, one
`decode_step` for all rows, `add` for a prefilled row and `remove` for rows that finished
or whose client went away. Every operation of a decode step is row-wise, so a row's
logits do not depend on which other rows share the batch (greedy answers are the same
alone or batched).

    batch = DecodeBatch(vlm)
    batch.add("a", *prefill(vlm, ids_a))
    batch.step([token_a])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Iterable, Sequence

import torch

from vrwkv_core.infer.generate import decode_step, language_model
from vrwkv_core.model.rwkv.state import RWKVState

if TYPE_CHECKING:
    from vrwkv_core.model.rwkv.state import RWKVState


class DecodeBatch:
    """Rows (by key) decoding together; see the module docstring."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lm = language_model(model)
        self.keys: list[Hashable] = []
        self.logits: torch.Tensor | None = None  # [B, V] float32: each row's next-token logits
        self.state: RWKVState | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: Hashable, logits: torch.Tensor, state: RWKVState) -> None:
        """Appends a prefilled row (its last-position logits [1, V] and one-row state)."""
        self.keys.append(key)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.state = state if self.state is None else RWKVState.cat([self.state, state])

    def remove(self, keys: Iterable[Hashable]) -> None:
        """Drops rows (their state rows are selected away)."""
        gone = set(keys)
        keep = [i for i, k in enumerate(self.keys) if k not in gone]
        if len(keep) == len(self.keys):
            return
        self.keys = [self.keys[i] for i in keep]
        if not keep:
            self.logits, self.state = None, None
            return
        assert self.logits is not None and self.state is not None
        self.logits = self.logits[torch.as_tensor(keep, device=self.logits.device)]
        self.state = self.state.select(keep)

    def row_state(self, key: Hashable) -> RWKVState:
        """A copy of one row's state (batch size 1)."""
        assert self.state is not None
        return self.state.select([self.keys.index(key)])

    def step(self, tokens: Sequence[int]) -> None:
        """Feeds one token per row (in row order) in one batched forward."""
        if len(tokens) != len(self.keys):
            raise ValueError(f"{len(tokens)} tokens for {len(self.keys)} rows")
        assert self.state is not None
        self.logits, self.state = decode_step(self.lm, torch.tensor(tokens, dtype=torch.long), self.state)


__all__ = ["DecodeBatch"]
