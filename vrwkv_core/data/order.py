"""The original VisualRWKV sample order: visit sample k^3 mod p, p a prime = 2 mod 3.

The original's dataset (RWKV-LM's "magic prime" trick) numbers every sample it draws
k = n * world_size + rank, n counting the micro-samples this rank has drawn since the start
of training (across its mini-epochs, which tile k without gaps). It reads record
`k^3 mod p` while k < p and record `N - 1 - (k^3 mod p)` (the reversed list) after, where
p is the largest prime below the dataset size N with p mod 3 = 2: cubing is then a
permutation of [0, p), so the first p draws visit p distinct records, never the last N - p.

    sampler = OriginalOrderSampler(len(dataset), n_samples=max_steps * grad_accum * micro_batch)
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Sampler

from vrwkv_core.errors import DataError


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


def magic_prime(n: int) -> int:
    """The largest prime p < n with p mod 3 = 2 (the original's `largest_3n_plus_2_prime`)."""
    p = 3 * (n // 3) + 2
    while p >= 2:
        if p < n and _is_prime(p):
            return p
        p -= 3
    raise DataError(f"{n} records are too few for data.order=original (it needs a prime 3n+2 below the count)",
                    hint="use data.order=shuffle for tiny data")


def original_index(k: int, n: int, p: int) -> int:
    """The record the original reads for draw number k of a dataset of n records."""
    i = pow(k, 3, p)
    return i if k < p else n - 1 - i


class OriginalOrderSampler(Sampler[int]):
    """This rank's indices in the original order; resumable like `ResumableSampler`."""

    def __init__(self, dataset_len: int, n_samples: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.dataset_len = dataset_len
        self.prime = magic_prime(dataset_len)
        self.num_samples = n_samples
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.consumed = 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """The order is one sequence over the whole stage: epochs do not restart it."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        while self.consumed < self.num_samples:
            k = self.consumed * self.world_size + self.rank
            self.consumed += 1
            yield original_index(k, self.dataset_len, self.prime)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "world_size": self.world_size,
                "dataset_len": self.dataset_len, "order": 1}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the saved draw count (scaled when the world size changed)."""
        if state.get("dataset_len", self.dataset_len) != self.dataset_len:
            raise DataError(f"sampler state was saved with dataset_len={state['dataset_len']}, this run has {self.dataset_len}",
                            hint="resume with the same data")
        old_ws = int(state.get("world_size", self.world_size))
        self.consumed = min(int(state["consumed"]) * old_ws // self.world_size, self.num_samples)
