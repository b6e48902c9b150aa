"""Reading user text files: UTF-8 problems and unreadable paths become one-line errors.

Every reader of a user's text (recipes, config.yaml, records, questions, answers,
annotations) goes through `read_text` or `iter_lines`, so invalid UTF-8 is reported as
`FILE:LINE: not UTF-8 text (byte B)` rather than a `UnicodeDecodeError` traceback, and a
path that is a folder, unreadable or holds a NUL byte is named with what is wrong.

    text = read_text("recipes/tiny.yaml", max_bytes=1 << 20, error=RecipeError)
    for lineno, line in iter_lines("answers.jsonl"):
        ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from vrwkv_core.errors import DataError, VrwkvError


def not_utf8(path: str | os.PathLike, data: bytes, err: UnicodeDecodeError, *, line: int | None = None,
             offset: int = 0, error: type[VrwkvError] = DataError) -> VrwkvError:
    """The error for bytes of `path` that are not UTF-8: names the line and the byte offset."""
    if line is None:
        line = data.count(b"\n", 0, err.start) + 1
    return error(f"{path}:{line}: not UTF-8 text (byte {offset + err.start}: {err.reason})",
                 hint="save the file as UTF-8")


def bad_utf8_in(path: str | os.PathLike, *, error: type[VrwkvError] = DataError) -> VrwkvError:
    """The error for a text-mode reader that met invalid UTF-8 in `path`: rescans the bytes
    to name the first bad line and byte offset (a streaming decoder's offsets are per block)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as err:
                    return not_utf8(path, block, err, line=line + block.count(b"\n", 0, max(err.start, 0)),
                                    offset=offset, error=error)
                offset += len(block)
                line += block.count(b"\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        return error(f"{path}:{line}: not UTF-8 text (the file ends inside a character: {err.reason})",
                     hint="save the file as UTF-8")
    except OSError as err:
        return error(f"{path}: {path_problem(path, err)}")
    return error(f"{path}: not UTF-8 text", hint="save the file as UTF-8")


def path_problem(path: str | os.PathLike, err: BaseException) -> str:
    """What is wrong with a path, in words (for an OSError or a ValueError such as a NUL byte)."""
    if isinstance(err, ValueError):
        return "the path contains a NUL byte" if "null" in str(err) else str(err)
    if isinstance(err, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(err, (NotADirectoryError, FileExistsError)):  # FileExistsError: mkdir met a file
        return "a part of the path is a file, not a folder"
    if isinstance(err, FileNotFoundError):
        return "not found"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    return str(err)


def read_bytes(path: str | os.PathLike, *, max_bytes: int | None = None, what: str = "file",
               error: type[VrwkvError] = DataError) -> bytes:
    """A file's bytes; an error naming the path when it cannot be read or exceeds `max_bytes`."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1) if max_bytes is not None else f.read()
    except (OSError, ValueError) as err:
        raise error(f"{os.fsdecode(path) if isinstance(path, bytes) else path}: {what} {path_problem(path, err)}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{path}: {what} is larger than {max_bytes:,} bytes", hint=f"this is not a {what}")
    return data


def read_text(path: str | os.PathLike, *, max_bytes: int | None = None, what: str = "file",
              error: type[VrwkvError] = DataError, bom: bool = False) -> str:
    """A UTF-8 file's text (a leading BOM dropped when `bom`); errors name the path, line and byte."""
    data = read_bytes(path, max_bytes=max_bytes, what=what, error=error)
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, data, err, error=error) from None


def iter_lines(path: str | os.PathLike, *, what: str = "file", bom: bool = True,
               error: type[VrwkvError] = DataError) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line) of a UTF-8 text file, streamed; errors name the line."""
    try:
        f = open(path, "rb")
    except (OSError, ValueError) as err:
        raise error(f"{path}: {what} {path_problem(path, err)}") from None
    offset = 0
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and bom and raw.startswith(b"\xef\xbb\xbf"):
                raw, offset = raw[3:], 3
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise not_utf8(path, raw, err, line=lineno, offset=offset, error=error) from None
            offset += len(raw)


def inside(folder: str | os.PathLike, relative: str) -> Path | None:
    """`folder/relative` resolved (symlinks followed) when it stays inside `folder`, else None.

    Absolute paths, `..` escapes, symlinks pointing out and NUL bytes all give None.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        return None
    try:
        base = Path(folder).resolve()
        target = (base / relative).resolve()
    except (OSError, ValueError, RuntimeError):
        return None
    return target if target == base or base in target.parents else None
