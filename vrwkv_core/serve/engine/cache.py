"""The prefix state cache: RNN states after conversation prefixes, LRU-bounded in bytes.

A key is the sha256 of a prefix's token ids and the content keys of the images in it, so
a follow-up request (which repeats the earlier turns) finds the state after the longest
cached prefix and prefills only the rest. `AnswerMemo` remembers the token ids of each
answer the server gave, so the answer coming back in a follow-up is encoded to the ids
the state has seen (re-tokenizing the text may split it differently).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from vrwkv_core.model.rwkv.state import RWKVState


def prefix_key(ids: Sequence[int], image_keys: Sequence[str]) -> str:
    """sha256 of the image content keys and the token ids of a prefix."""
    h = hashlib.sha256("|".join(image_keys).encode())
    h.update(b"#")
    h.update(",".join(map(str, ids)).encode())
    return h.hexdigest()


def state_bytes(state: RWKVState) -> int:
    """Bytes held by a state's tensors."""
    return sum(t.numel() * t.element_size() for part in (state.att_shift, state.wkv, state.ffn_shift) for t in part)


class StateCache:
    """key -> one-row RWKVState, least recently used out past `max_bytes` (0 disables it).

    Used by the scheduler thread only; `nbytes`/`len` may be read from others.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, tuple[RWKVState, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> RWKVState | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, state: RWKVState) -> None:
        size = state_bytes(state)
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        self._items[key] = (state, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, n) = self._items.popitem(last=False)
            self.nbytes -= n

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


class AnswerMemo:
    """answer text -> the token ids generated for it (closing `\\n\\n` included); thread-safe LRU."""

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> list[int] | None:
        with self._lock:
            ids = self._items.get(text)
            if ids is not None:
                self._items.move_to_end(text)
            return ids

    def put(self, text: str, ids: list[int]) -> None:
        with self._lock:
            self._items[text] = list(ids)
            self._items.move_to_end(text)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)


__all__ = ["AnswerMemo", "StateCache", "prefix_key", "state_bytes"]
