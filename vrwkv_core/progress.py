"""A tiny progress interface so the core can report progress without importing Rich.

Core functions take `progress: Progress | None`; the CLI passes a Rich-backed subclass.
"""

from __future__ import annotations

from typing import Any


class Progress:
    """No-op progress sink; subclasses render it. `fields` carry live numbers (loss, lr...)."""

    def start(self, description: str, total: int | None = None) -> None:
        pass

    def update(self, advance: int = 1, **fields: Any) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


NULL_PROGRESS = Progress()
