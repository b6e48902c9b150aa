"""Errors that the CLI turns into one line plus a hint (no traceback unless --debug).

Every error a user can cause with bad input (a recipe, a data file, a checkpoint, a
download) derives from `VrwkvError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VrwkvError(Exception):
    """A known, user-facing failure: `str(err)` is one line naming the file/key."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class RecipeError(VrwkvError):
    """A recipe that does not parse or does not fit the schema."""


class DataError(VrwkvError):
    """A data file or image that cannot be used."""


class CheckpointError(VrwkvError):
    """A weights file that is not a checkpoint we can load."""


class DownloadError(VrwkvError):
    """A hub download or verification that failed."""


class NotImplementedYet(VrwkvError):
    """A subcommand whose capability has not landed yet (exit code 2)."""

    exit_code = 2
