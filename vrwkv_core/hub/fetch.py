"""Fetching artifacts through huggingface_hub, and resolving names to local files.

`download()` asks the hub for each file's metadata (exact size, LFS sha256), checks the
free disk space, lets `hf_hub_download` fetch into its cache (or `--dir`), then hashes
the file and records the pass. huggingface_hub writes to a uniquely named `.incomplete`
file and renames it only once the byte count matches, so a killed download never looks
complete; the next run starts that file again and removes partials a dead process left.

Environment, read at call time: HF_TOKEN (gated repos), HF_HUB_OFFLINE (cache only),
HF_ENDPOINT (a mirror), HF_HOME / HF_HUB_CACHE (where the cache is).
Every failure a user can meet (offline and absent, gated, network, HTTP, unknown name)
becomes one DownloadError line with a hint.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from vrwkv_core.errors import DownloadError
from vrwkv_core.hub.integrity import check_file, find_local, raise_on_mismatch
from vrwkv_core.hub.registry import Artifact, get_artifact, list_artifacts, strip_prefix
from vrwkv_core.paths import hf_cache_dir
from vrwkv_core.progress import NULL_PROGRESS, Progress

STALE_PARTIAL_S = 300
"""A partial file untouched this long, whose download lock is free, belongs to a dead process."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """HF_HUB_OFFLINE as set now, or as huggingface_hub read it at import."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str | None:
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _command(art: Artifact, dir: str | Path | None) -> str:  # noqa: A002
    return f"vrwkv download {art.name}" + (f" --dir {dir}" if dir is not None else "")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def map_error(err: BaseException, art: Artifact, filename: str, revision: str | None) -> DownloadError | None:
    """huggingface_hub / httpx exceptions as one-line DownloadErrors; None for anything else (a bug)."""
    from huggingface_hub import errors as hf

    try:
        import httpx2 as httpx  # what huggingface_hub >= 1.x uses
    except ImportError:  # pragma: no cover - older huggingface_hub on httpx
        import httpx  # type: ignore[no-redef]
    repo = art.repo_id
    rerun = f"`vrwkv download {art.name}`"
    if isinstance(err, hf.GatedRepoError):
        return DownloadError(f"{repo} is a gated repo and this account has no access to it",
                             hint=f"accept its terms at {art.url}, set HF_TOKEN (or `hf auth login`), then run {rerun}")
    if isinstance(err, hf.RepositoryNotFoundError):
        return DownloadError(f"hub repo {repo} not found (or private and HF_TOKEN lacks access)",
                             hint="check the repo id in the registry, HF_ENDPOINT and HF_TOKEN")
    if isinstance(err, hf.RevisionNotFoundError):
        return DownloadError(f"revision '{revision}' not found in {repo}", hint="check --revision")
    if isinstance(err, hf.RemoteEntryNotFoundError):
        return DownloadError(f"{filename} not found in {repo} at revision {revision or 'main'}",
                             hint="the file may have been renamed upstream; a newer vrwkv may know the new name")
    if isinstance(err, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if offline():
            return DownloadError(f"{art.name} is not downloaded and HF_HUB_OFFLINE is set: run {rerun} "
                                 "with network access", hint="unset HF_HUB_OFFLINE to let vrwkv download it")
        cause = err.__cause__ or err
        return DownloadError(f"cannot reach the hub ({_endpoint() or 'huggingface.co'}) and {art.name} is not "
                             f"downloaded yet: {_one_line(cause)}",
                             hint=f"check the network, proxy or HF_ENDPOINT and run {rerun} again")
    if isinstance(err, hf.HfHubHTTPError):
        status = err.response.status_code if err.response is not None else "?"
        hint = "set HF_TOKEN to a token with access" if status in (401, 403) else f"try {rerun} again later"
        return DownloadError(f"the hub answered HTTP {status} for {repo}/{filename}", hint=hint)
    if isinstance(err, httpx.HTTPError):
        return DownloadError(f"network error while downloading {filename} from {repo}: "
                             f"{type(err).__name__}: {_one_line(err)}",
                             hint=f"run {rerun} again: partial files are never used and are cleaned up")
    if isinstance(err, hf.HFValidationError):
        return DownloadError(f"{art.name}: invalid hub reference {repo}/{filename}: {_one_line(err)}")
    if isinstance(err, OSError):
        return DownloadError(f"download of {filename} from {repo} failed: {_one_line(err)}",
                             hint=f"run {rerun} again: partial files are never used")
    return None


def _metadata(art: Artifact, filename: str, revision: str | None) -> Any:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(art.repo_id, filename, repo_type=art.repo_type, revision=revision,  # type: ignore[arg-type]
                     endpoint=_endpoint())
    return get_hf_file_metadata(url, endpoint=_endpoint())


def check_disk_space(needed: int, where: Path) -> None:
    """DownloadError if the filesystem holding `where` has less than `needed` bytes free."""
    probe = Path(os.path.abspath(where))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DownloadError(f"not enough disk space: the download needs {human_size(needed)}, "
                            f"{probe} has {human_size(free)} free",
                            hint="free some space, or pass --dir DIR on a larger disk (or set HF_HOME)")


def _remove_stale_partials(art: Artifact, filename: str, etag: str, target: Path | None) -> None:
    """Deletes `.incomplete` files of this blob that a killed download left behind."""
    from filelock import FileLock, Timeout
    from huggingface_hub.file_download import repo_folder_name

    if target is None:
        folder = repo_folder_name(repo_id=art.repo_id, repo_type=art.repo_type)  # type: ignore[arg-type]
        parts = list((hf_cache_dir() / folder / "blobs").glob(f"{etag}.*incomplete"))
        lock = hf_cache_dir() / ".locks" / folder / f"{etag}.lock"
    else:
        meta = target / ".cache" / "huggingface" / "download" / f"{filename}.metadata"
        parts = list(meta.parent.glob(f"*.{etag}*.incomplete"))
        lock = meta.with_suffix(".lock")
    now = time.time()
    stale = [p for p in parts if now - p.stat().st_mtime > STALE_PARTIAL_S]
    if not stale:
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        # huggingface_hub holds this lock for the whole transfer: free means nobody is writing.
        with FileLock(str(lock), timeout=0):
            for p in stale:
                p.unlink(missing_ok=True)
    except Timeout:
        pass


def _bar_class(progress: Progress, label: str) -> type:
    """A tqdm look-alike that huggingface_hub drives and that forwards bytes to `progress`."""

    class _Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
            self.total, self.n = total, initial
            progress.start(label, total=total)
            if initial:
                progress.update(initial)

        def update(self, n: int | None = 1) -> None:
            self.n += n or 0
            progress.update(n or 0)

        def update_transfer(self, n: int | None = 1) -> None:
            pass  # bytes on the wire; `update` already counts the bytes written

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            pass

        def close(self) -> None:
            pass

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.close()

    return _Bar


def _external_error(art: Artifact, dir: str | Path | None) -> DownloadError:  # noqa: A002
    where = Path(dir) / art.placement if dir is not None else Path("<data root>") / art.placement
    return DownloadError(f"{art.name} is not on the Hugging Face hub: get it from {art.source}",
                         hint=f"{art.notes} (folder: {where})")


def check_download_dir(folder: Path) -> None:
    """--dir must be a folder this user can write to (or creatable): checked before the hub is contacted."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"is under {existing}, which is a file"
        raise DownloadError(f"{folder}: --dir {where}, not a folder", hint="choose a folder for the downloads")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise DownloadError(f"{folder}: --dir is not writable ({existing}: permission denied)",
                            hint="choose a folder you can write to")


def download(
    name: str,
    dir: str | Path | None = None,  # noqa: A002
    revision: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> Path:
    """Downloads every file of artifact `name` (verified by sha256) and returns the main file's path.

    Files go to huggingface_hub's cache, or to `dir/<placement>/` when `dir` is given.
    Already-present verified files are not fetched again; `force` re-downloads and re-hashes.
    """
    art = get_artifact(name)
    progress = progress or NULL_PROGRESS
    if not art.on_hub:
        raise _external_error(art, dir)
    rev = revision or art.revision
    if dir is not None:
        check_download_dir(Path(dir).expanduser())
    target = Path(dir).expanduser() / art.placement if dir is not None else None
    is_offline = offline()
    if is_offline and force:
        raise DownloadError(f"cannot download {art.name} again: HF_HUB_OFFLINE is set",
                            hint="unset HF_HUB_OFFLINE to use --force")

    metas: dict[str, Any] = {}
    if not is_offline:
        try:
            for f in art.files:
                metas[f.filename] = _metadata(art, f.filename, rev)
        except Exception as err:
            mapped = map_error(err, art, f.filename, rev)
            if mapped is None:
                raise
            # The hub refused or is unreachable: use complete local copies, as huggingface_hub does.
            present = find_local(art, dir, rev)
            if force or len(present) < len(art.files):
                raise mapped from err
            progress.log(f"{art.name}: hub lookup failed ({_one_line(err)}); using the local copy")
            for f in art.files:
                raise_on_mismatch(check_file(art, f, present[f.filename], progress=progress), art.name)
            return present[art.main_file]
        present = {} if force else find_local(art, dir, rev)
        needed = sum((metas[f.filename].size or f.size or 0) for f in art.files if f.filename not in present)
        check_disk_space(needed, target or hf_cache_dir())

    from huggingface_hub import hf_hub_download

    paths: dict[str, Path] = {}
    for f in art.files:
        meta = metas.get(f.filename)
        if meta is not None and meta.etag:
            _remove_stale_partials(art, f.filename, meta.etag, target)
        try:
            got = hf_hub_download(
                art.repo_id,  # type: ignore[arg-type]
                f.filename,
                repo_type=art.repo_type,
                revision=rev,
                cache_dir=str(hf_cache_dir()),
                local_dir=target,
                endpoint=_endpoint(),
                local_files_only=is_offline,
                force_download=force,
                tqdm_class=_bar_class(progress, f"{art.name}: {f.filename}"),
            )
        except Exception as err:
            mapped = map_error(err, art, f.filename, rev)
            if mapped is None:
                raise
            raise mapped from err
        path = Path(got)
        check = check_file(art, f, path, hub_etag=meta.etag if meta else None, progress=progress, rehash=force)
        raise_on_mismatch(check, art.name)
        paths[f.filename] = path
    return paths[art.main_file]


_download = download  # `resolve` has a parameter of that name


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith(("~", ".")) or bool(Path(text).suffix)


def resolve(
    name_or_path: str | Path,
    download: bool = False,
    dir: str | Path | None = None,  # noqa: A002
    progress: Progress | None = None,
) -> Path:
    """A local path for a path or a registry name (`NAME` or `hub:NAME`).

    A path passes through unchanged (missing files are the caller's to report). A name
    resolves to its downloaded main file, hashed first if vrwkv has not verified it yet;
    if it is absent, `download=True` fetches it, otherwise DownloadError names the command.
    """
    text = str(name_or_path)
    if not text.startswith("hub:"):
        path = Path(text).expanduser()
        if path.exists():
            return path
        if strip_prefix(text) not in {a.name for a in list_artifacts()}:
            if _looks_like_path(text):
                return path
            get_artifact(text)  # raises "unknown artifact" with suggestions
    art = get_artifact(text)
    if download:
        return _download(art.name, dir=dir, progress=progress)
    found = find_local(art, dir)
    if len(found) < len(art.files):
        if not art.on_hub:
            raise _external_error(art, dir)
        where = f" in {Path(dir) / art.placement}" if dir is not None else ""
        raise DownloadError(f"{art.name} is not downloaded yet{where}: run `{_command(art, dir)}`",
                            hint=f"about {human_size(art.size)}; or add --download to fetch it on first use")
    for f in art.files:
        raise_on_mismatch(check_file(art, f, found[f.filename], progress=progress), art.name)
    return found[art.main_file]
