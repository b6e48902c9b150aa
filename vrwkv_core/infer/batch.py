"""A decoding batch whose rows join and leave between steps (continuous batching over RNN rows).

`generate_many` batches a fixed list of prompts under one sampling config; a server needs
rows that arrive at any time, each with its own config. `DecodeBatch` holds only the
shared part: the per-row logits and RNN states stacked on the batch dimension, one
`decode_step` for all rows, `add` for prefilled rows and `remove` for rows that finished
or whose client went away. Every operation of a decode step is row-wise, so a row's
logits depend on the other rows only through the matmul's rounding (~1e-6; greedy
answers are the same alone or batched).

A step costs no copy of the state: the model returns fresh state tensors, which the batch
keeps. `remove` moves the last rows into the holes and narrows the tensors to a view, so
a finished row costs one row copy rather than a copy of every row that stays.

    batch = DecodeBatch(vlm)
    batch.add(["a"], *prefill(vlm, ids_a))
    batch.step([token_a])
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import torch

from vrwkv_core.infer.generate import decode_step, language_model
from vrwkv_core.model.rwkv.state import PARTS, RWKVState


class DecodeBatch:
    """Rows (by key) decoding together; see the module docstring."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lm = language_model(model)
        self.keys: list[Hashable] = []
        self.logits: torch.Tensor | None = None  # [B, V] float32: each row's next-token logits
        self.state: RWKVState | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: Sequence[Hashable], logits: torch.Tensor, state: RWKVState) -> None:
        """Appends prefilled rows: their last-position logits [k, V] and k-row state (copied, so
        the batch owns its tensors and may move rows in place)."""
        if len(keys) != logits.shape[0] or len(keys) != state.batch_size:
            raise ValueError(f"{len(keys)} keys for {logits.shape[0]} logits rows and {state.batch_size} state rows")
        self.keys.extend(keys)
        self.logits = torch.cat([logits] if self.logits is None else [self.logits, logits])
        self.state = RWKVState.cat([state] if self.state is None else [self.state, state])

    def remove(self, keys: Iterable[Hashable]) -> None:
        """Drops rows: the rows past the new end move into the holes, then every tensor is
        narrowed (a view); the order of the remaining keys may change."""
        gone = set(keys)
        n = len(self.keys)
        n_keep = sum(1 for k in self.keys if k not in gone)
        if n_keep == n:
            return
        if n_keep == 0:
            self.keys, self.logits, self.state = [], None, None
            return
        assert self.logits is not None and self.state is not None
        holes = [i for i in range(n_keep) if self.keys[i] in gone]
        movers = [i for i in range(n_keep, n) if self.keys[i] not in gone]
        if holes:
            dst = torch.tensor(holes, device=self.logits.device)
            src = torch.tensor(movers, device=self.logits.device)
            for t in [self.logits, *(t for part in PARTS for t in getattr(self.state, part))]:
                t.index_copy_(0, dst, t.index_select(0, src))
            for h, m in zip(holes, movers):
                self.keys[h] = self.keys[m]
        del self.keys[n_keep:]
        self.logits = self.logits[:n_keep]
        self.state = self.state.select(slice(0, n_keep))

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


def greedy_tokens(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> list[int]:
    """The argmax of each row of `logits` [B, V] with that row's `banned` tokens excluded: what a
    greedy, penalty-free `Sampler` picks, for all rows at once."""
    picked = logits.argmax(-1).tolist()
    V = logits.shape[-1]
    for i, ban in enumerate(banned):
        if picked[i] in ban:  # rare: only then is the row masked (no [B, V] copy per step)
            row = logits[i].float().clone()
            row[[t for t in ban if 0 <= t < V]] = float("-inf")
            picked[i] = int(row.argmax())
    return picked


__all__ = ["DecodeBatch", "greedy_tokens"]
