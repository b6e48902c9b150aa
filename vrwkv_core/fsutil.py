"""Atomic file writes: write a temp file beside the target, fsync it, then `os.replace` it in.

A crash never leaves a half-written file under the final name: readers see the old file
or the new one. The temp file gets the usual mode (0666 less the umask, so 0644 by
default) rather than `mkstemp`'s 0600, whoever wrote it (safetensors also writes 0600).

- `atomic_open(path, mode)`: a file object, for code that writes a stream.
- `atomic_path(path)`: a temp path, for writers that take a filename
  (`safetensors.torch.save_file`, `torch.save`, matplotlib's `savefig`); it keeps
  `path`'s suffix, so writers that pick a format by extension still do.
- `atomic_write_text` / `atomic_write_bytes`: the one-call forms.

The temp file is `.NAME.tmp.SUFFIX`, so a write killed midway leaves one stale temp that
the next write of that file replaces. Where several processes may write one file at once
(eval shards), `unique=True` gives each write its own temp name instead; the last rename
wins. `fsync=False` skips the two fsyncs (file, then folder) for bulk writers that can
detect and redo a lost file themselves.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def fsync_dir(folder: str | os.PathLike) -> None:
    """Makes renames inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsyncs a file, or every file under a folder."""
    path = Path(path)
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True, unique: bool = False) -> Iterator[Path]:
    """A temp path in `path`'s folder; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if unique:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
        tmp.unlink(missing_ok=True)  # a stale temp of a killed write (or a symlink: never written through)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        if fsync:
            fsync_tree(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = True, unique: bool = False) -> Iterator[IO]:
    """Opens a temp file in `path`'s folder (mode "w" or "wb"); on success it replaces `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path, fsync=fsync, unique=unique) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True, unique: bool = False) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w", fsync=fsync, unique=unique) as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True, unique: bool = False) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_open(path, "wb", fsync=fsync, unique=unique) as f:
        f.write(data)
