"""What is on disk: finding an artifact's files, hash checks, and the record of verified files.

A file is trusted once its sha256 matched an expected value, in this order of authority:
the registry's pinned hash, the hub's LFS sha256 (the ETag of an LFS file, recorded at
download time), the name of its blob in a huggingface_hub cache (blobs are named by that
same hash), or the ETag huggingface_hub stored beside a `--dir` download. A non-LFS hub
file's ETag is its git blob SHA-1, which is checked the same way. Nothing to compare with
(a file copied in by hand) means the file is hashed and recorded, not vouched for.

The record (`$VRWKV_CACHE_DIR/verified.json`, default ~/.cache/vrwkv; see paths.py) maps an absolute path
to its size, mtime and hash. It is written only after a check passes, so an interrupted
download or a failed check never reads as verified; a file whose size or mtime changed is
hashed again before use. `vrwkv download --verify` re-hashes regardless.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vrwkv_core.errors import DownloadError
from vrwkv_core.fsutil import atomic_write_text
from vrwkv_core.hub.registry import Artifact, ArtifactFile, get_artifact
from vrwkv_core.paths import cache_dir, hf_cache_dir, verified_record
from vrwkv_core.progress import NULL_PROGRESS, Progress

CHUNK = 8 * 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
FIRST_USE = "the sha256 recorded when first used"


@dataclass
class Expected:
    """An expected digest: `algo` is "sha256" or "git-sha1"; `source` says where it came from."""

    algo: str
    digest: str
    source: str


@dataclass
class FileCheck:
    """The outcome of checking one file on disk."""

    filename: str
    path: Path | None
    expected: Expected | None = None
    actual: str | None = None
    ok: bool = False
    detail: str = ""

    def describe(self) -> str:
        if self.path is None:
            return f"{self.filename}: missing"
        if self.ok:
            how = f"matches {self.expected.source}" if self.expected else "hashed (nothing to compare with)"
            return f"{self.path}: ok, {how}"
        assert self.expected is not None
        return (f"{self.path}: {self.expected.algo} mismatch: expected {self.expected.digest} "
                f"({self.expected.source}), got {self.actual}")


@dataclass
class VerifyReport:
    """Per-file results of `verify()`; truthy when every file is present and matches."""

    name: str
    files: list[FileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.files) and all(f.ok for f in self.files)

    def __bool__(self) -> bool:
        return self.ok


def hash_file(path: Path, want_git_sha1: bool = False, progress: Progress | None = None) -> dict[str, str]:
    """Streams `path` once; returns {"sha256": ..., ["git-sha1": ...]} as hex digests."""
    progress = progress or NULL_PROGRESS
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    # A git blob id is sha1(b"blob <size>\0" + content): what the hub sends as the ETag of non-LFS files.
    sha1 = hashlib.sha1(f"blob {size}\0".encode()) if want_git_sha1 else None
    progress.start(f"verifying {path.name}", total=size)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
            progress.update(len(chunk))
    out = {"sha256": sha256.hexdigest()}
    if sha1 is not None:
        out["git-sha1"] = sha1.hexdigest()
    return out


def expected_from_etag(etag: str | None, source: str) -> Expected | None:
    """The hub's ETag as an expected digest: sha256 for LFS files, git SHA-1 for the rest."""
    if not etag:
        return None
    etag = etag.strip('"').lower()
    if SHA256_RE.match(etag):
        return Expected("sha256", etag, source)
    if SHA1_RE.match(etag):
        return Expected("git-sha1", etag, source)
    return None


def _load() -> dict[str, dict]:
    try:
        data = json.loads(verified_record().read_text(encoding="utf-8"))
        return data.get("files", {}) if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _lock() -> Any:
    from filelock import FileLock

    cache_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(verified_record()) + ".lock")


def _update(key: str, entry: dict) -> None:
    """Sets one record entry; the file is replaced atomically under a lock."""
    with _lock():
        files = _load()
        files[key] = entry
        atomic_write_text(verified_record(), json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))


def _key(path: Path) -> str:
    return str(Path(os.path.abspath(path)))


def record_entry(path: Path) -> dict | None:
    """The record for `path` whatever its current state, or None."""
    return _load().get(_key(path))


def is_verified(path: Path) -> bool:
    """True if `path` passed a check and has not changed (size, mtime) since."""
    entry = record_entry(path)
    if entry is None:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns


def recorded_paths(name: str, filename: str) -> list[Path]:
    """Existing files recorded for artifact `name`, newest check first."""
    hits = [(e.get("checked_at", 0), Path(k)) for k, e in _load().items()
            if e.get("name") == name and e.get("file") == filename]
    return [p for _, p in sorted(hits, reverse=True) if p.is_file()]


def local_expected(path: Path, filename: str) -> Expected | None:
    """A digest known from where the file sits: its cache blob name, or hub metadata beside a --dir copy."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and real != Path(os.path.abspath(path)):
        got = expected_from_etag(real.name, "the hub cache blob name")
        if got is not None:
            return got
    # huggingface_hub keeps `<dir>/.cache/huggingface/download/<file>.metadata`: commit, etag, timestamp.
    parts = Path(filename).parts
    root = Path(os.path.abspath(path))
    for _ in parts:
        root = root.parent
    meta = root / ".cache" / "huggingface" / "download" / (filename + ".metadata")
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return expected_from_etag(lines[1] if len(lines) > 1 else None, "the hub ETag recorded by huggingface_hub")


def expected_for(art_file: ArtifactFile, path: Path, hub_etag: str | None = None) -> Expected | None:
    """The best expected digest for `path`: pinned > hub now > our record > local hub metadata > first use."""
    if art_file.sha256:
        return Expected("sha256", art_file.sha256.lower(), "the registry's pinned sha256")
    got = expected_from_etag(hub_etag, "the hub's LFS sha256")
    if got is not None:
        return got
    entry = record_entry(path)
    if entry and entry.get("expected"):
        return Expected(entry.get("expected_algo", "sha256"), entry["expected"], "the hub hash recorded at download")
    got = local_expected(path, art_file.filename)
    if got is None and entry and entry.get("sha256"):
        got = Expected("sha256", entry["sha256"], FIRST_USE)
    return got


def check_file(
    art: Artifact,
    art_file: ArtifactFile,
    path: Path,
    hub_etag: str | None = None,
    progress: Progress | None = None,
    rehash: bool = False,
) -> FileCheck:
    """Hashes `path` (unless the record already vouches for it) and compares; records a pass."""
    expected = expected_for(art_file, path, hub_etag)
    entry = record_entry(path)
    if not rehash and is_verified(path) and entry is not None and (
        expected is None or entry.get(expected.algo) == expected.digest
    ):
        return FileCheck(art_file.filename, path, expected, entry.get("sha256"), ok=True, detail="recorded")
    digests = hash_file(path, want_git_sha1=expected is not None and expected.algo == "git-sha1", progress=progress)
    actual = digests[expected.algo] if expected else digests["sha256"]
    ok = expected is None or actual == expected.digest
    if expected is not None and expected.source == FIRST_USE:
        expected_ref = None  # still no independent reference for this file
    else:
        expected_ref = expected
    if ok:
        st = path.stat()
        _update(_key(path), {
            "name": art.name, "file": art_file.filename, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": digests["sha256"], **({"git-sha1": digests["git-sha1"]} if "git-sha1" in digests else {}),
            "expected": expected_ref.digest if expected_ref else None,
            "expected_algo": expected_ref.algo if expected_ref else None,
            "checked_at": time.time(),
        })
    # On a mismatch an existing entry stays: it may hold the only reference hash (first use).
    return FileCheck(art_file.filename, path, expected, actual, ok=ok)


def raise_on_mismatch(check: FileCheck, name: str) -> None:
    """One-line DownloadError for a failed check (file, expected and actual hash)."""
    if check.ok:
        return
    assert check.expected is not None
    if check.expected.source == FIRST_USE:
        hint = (f"it changed since vrwkv first hashed it and has no other reference hash; if that was "
                f"intended, delete its entry from {verified_record()}")
    else:
        hint = f"the file is corrupt or was replaced upstream; run `vrwkv download {name} --force` to fetch it again"
    raise DownloadError(
        f"{check.path}: {check.expected.algo} mismatch: expected {check.expected.digest} "
        f"({check.expected.source}), got {check.actual}",
        hint=hint,
    )


def find_local(
    art: Artifact, dir: str | Path | None = None, revision: str | None = None  # noqa: A002
) -> dict[str, Path]:
    """The artifact's files on disk: in `dir/<placement>` if given, else in the hub cache or
    wherever the record last saw them (an earlier `--dir` download). Partial downloads never count."""
    found: dict[str, Path] = {}
    for f in art.files:
        path = _find_one(art, f, dir, revision)
        if path is not None:
            found[f.filename] = path
    return found


def _find_one(
    art: Artifact, f: ArtifactFile, dir: str | Path | None, revision: str | None  # noqa: A002
) -> Path | None:
    if dir is not None:
        path = Path(dir).expanduser() / art.placement / f.filename
        return path if path.is_file() else None
    if art.on_hub:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(
            art.repo_id, f.filename, cache_dir=str(hf_cache_dir()),  # type: ignore[arg-type]
            revision=revision or art.revision or "main", repo_type=art.repo_type,
        )
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    seen = recorded_paths(art.name, f.filename)
    return seen[0] if seen else None


def verify(name: str, dir: str | Path | None = None, progress: Progress | None = None) -> VerifyReport:  # noqa: A002
    """Re-hashes every file of artifact `name` on disk and compares; works offline."""
    art = get_artifact(name)
    found = find_local(art, dir)
    report = VerifyReport(art.name)
    for f in art.files:
        path = found.get(f.filename)
        if path is None:
            report.files.append(FileCheck(f.filename, None, detail="missing"))
        else:
            report.files.append(check_file(art, f, path, progress=progress, rehash=True))
    return report


def local_status(name: str, dir: str | Path | None = None) -> str:  # noqa: A002
    """A phrase for `--list`: verified, present (...), partial (k/n files), absent, manual download."""
    art = get_artifact(name)
    found = find_local(art, dir)
    if not found:
        return "absent" if art.on_hub else "manual download"
    if len(found) < len(art.files):
        return f"partial ({len(found)}/{len(art.files)} files)"
    if not all(is_verified(p) for p in found.values()):
        return "present (not verified)"
    if any(not (record_entry(p) or {}).get("expected") for p in found.values()):
        return "present (hashed, no reference hash)"
    return "verified"
