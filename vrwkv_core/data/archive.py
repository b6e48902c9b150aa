"""Safe extraction of zip and tar (gz/bz2/xz) archives, resumable.

Every member's destination is checked before anything is written: names with `..`,
absolute names (also `C:` drives and backslash roots), symlinks, hardlinks, devices and
FIFOs are refused and reported, and so is any destination whose resolved parent falls
outside the output folder (e.g. through a symlink already there). Regular files are
streamed to a temp file and renamed into place, so an interrupted run leaves no partial
files; re-running skips files that already exist with the member's size.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from vrwkv_core.errors import DataError
from vrwkv_core.fsutil import atomic_open
from vrwkv_core.progress import Progress


@dataclass
class ExtractReport:
    """Counts of one extraction; `refused` holds (member name, reason)."""

    archive: Path
    out_dir: Path
    extracted: int = 0
    skipped: int = 0
    bytes_written: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)

    def refused_summary(self, shown: int = 3) -> str:
        """One line: how many members were refused, the first few with their reasons."""
        first = ", ".join(f"{name!r} ({why})" for name, why in self.refused[:shown])
        more = f" and {len(self.refused) - shown} more" if len(self.refused) > shown else ""
        return f"{len(self.refused)} unsafe members refused (not written): {first}{more}"


def safe_destination(root: Path, name: str) -> tuple[Path | None, str]:
    """Destination of member `name` under the resolved `root`, or (None, reason)."""
    if not name or "\x00" in name:
        return None, "empty or invalid name"
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        return None, "absolute path"
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "'..' in path"
    if not parts:
        return None, "empty or invalid name"
    dest = root.joinpath(*parts)
    if not dest.parent.resolve().is_relative_to(root):
        return None, "lands outside the output folder (through a symlink)"
    if dest.is_symlink():
        return None, "destination is an existing symlink"
    return dest, ""


def _extract_member(root: Path, name: str, is_dir: bool, size: int, opener: Callable[[], IO[bytes]],
                    report: ExtractReport) -> None:  # fmt: skip
    """One folder or regular file under `root` (kept when its size already matches), or
    the reason it is refused in `report.refused`."""
    dest, why = safe_destination(root, name)
    if dest is None:
        report.refused.append((name, why))
        return
    try:
        if is_dir:
            dest.mkdir(parents=True, exist_ok=True)
            return
        if dest.is_file() and dest.stat().st_size == size:
            report.skipped += 1
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        # No fsync per member (tens of thousands of images): a file lost to a crash comes back
        # short or missing, and the size check above extracts it again.
        with opener() as src, atomic_open(dest, "wb", fsync=False) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        # e.g. a file entry `a` followed by `a/b`: one name cannot be both a file and a folder
        report.refused.append((name, "a file and a folder of the same name"))
        return
    except (NotImplementedError, RuntimeError) as e:  # zip: unsupported compression or encrypted
        report.refused.append((name, f"cannot be read ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"))
        return
    report.extracted += 1
    report.bytes_written += size


def _extract_zip(archive: Path, root: Path, report: ExtractReport, progress: Progress) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        progress.start(f"extracting {archive.name}", total=len(infos))
        for info in infos:
            progress.update(1)
            mode = info.external_attr >> 16
            if info.create_system == 3 and stat.S_ISLNK(mode):  # 3: made on Unix, mode bits are meaningful
                report.refused.append((info.filename, "symlink"))
                continue
            _extract_member(root, info.filename, info.is_dir(), info.file_size, lambda: zf.open(info), report)


def _extract_tar(archive: Path, root: Path, report: ExtractReport, progress: Progress) -> None:
    progress.start(f"extracting {archive.name}", total=None)
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:  # streams: compressed tars are read once, front to back
            progress.update(1)
            if member.issym() or member.islnk():
                report.refused.append((member.name, f"{'symlink' if member.issym() else 'hardlink'} to {member.linkname!r}"))
                continue
            if not (member.isfile() or member.isdir()):
                report.refused.append((member.name, "device, FIFO or other special file"))
                continue
            _extract_member(root, member.name, member.isdir(), member.size,
                            lambda: tf.extractfile(member), report)  # type: ignore[arg-type,return-value]


def extract_archive(archive: str | os.PathLike, out_dir: str | os.PathLike, progress: Progress | None = None) -> ExtractReport:
    """Extract a zip or tar archive into `out_dir`; unsafe members are skipped and listed in `refused`."""
    archive, out = Path(archive), Path(out_dir)
    if not archive.is_file():
        raise DataError(f"{archive}: no such file")
    progress = progress or Progress()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out is a file, not a folder", hint="choose a folder to extract into")
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    report = ExtractReport(archive, out)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, root, report, progress)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, root, report, progress)
        else:
            raise DataError(f"{archive}: not a zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as e:
        raise DataError(f"{archive}: damaged archive ({type(e).__name__}: {e})") from None
    finally:
        progress.close()
    return report
