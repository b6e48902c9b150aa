"""A stage's out_dir is never overwritten by mistake, nor shared by two runs at once.

- `check_out_dir`: a fresh run into an out_dir that holds a run (its checkpoints, model or
  config) is refused unless the user says `--resume` or `--overwrite`.
- `OutDirLock`: `out_dir/.lock` holds the pid and host of the run using the folder. A
  second run refuses while that process lives; a lock left by a dead process on this
  host is taken over with a warning. The lock is created with its content in one step
  (a hard link of a finished temp file), so a reader never sees a half-written lock.

Only global rank 0 calls these: the processes Lightning, torchrun or SLURM start with a
non-zero rank re-run the same command and must not refuse their own run's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from vrwkv_core.errors import VrwkvError
from vrwkv_core.progress import Progress

LOCK = ".lock"
# What a stage writes: any of these means the folder holds a run worth keeping.
RUN_FILES = ("config.yaml", "model.safetensors", "last.ckpt", "prev.ckpt", "checkpoints.json", "metrics.csv")


def check_out_dir(out_dir: Path, stage: str, resume: bool, overwrite: bool) -> None:
    """Refuses an out_dir that is a file, or that holds a run when neither resuming nor overwriting."""
    if out_dir.exists() and not out_dir.is_dir():
        raise VrwkvError(f"{out_dir}: {stage}.out_dir is a file, not a folder", hint=f"set {stage}.out_dir=ANOTHER/FOLDER")
    if resume or overwrite or not out_dir.is_dir():
        return
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if held:
        raise VrwkvError(f"{out_dir} already holds a run ({', '.join(held[:3])}); a fresh {stage} would overwrite it",
                         hint=f"pass --resume to continue it, --overwrite to replace it, or set {stage}.out_dir")  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not isinstance(data.get("host"), str):
        return None
    return data


class OutDirLock:
    """`out_dir/.lock` for the life of a run (a context manager)."""

    def __init__(self, out_dir: Path, progress: Progress) -> None:
        self.path = out_dir / LOCK
        self.progress = progress
        self.mine = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.mine) + "\n", encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    self._create(tmp)
                    self.held = True
                    return
                except FileExistsError:
                    holder = _read_lock(self.path)
                    if holder is None:
                        raise VrwkvError(f"{self.path}: another run may be using this folder (its lock is unreadable)",
                                         hint="if no run uses it, delete the .lock file") from None  # fmt: skip
                    same_host = holder["host"] == self.mine["host"]
                    if same_host and not _alive(holder["pid"]):
                        self.progress.log(f"warning: {self.path}: taking over the stale lock of process "
                                          f"{holder['pid']} (no longer running)")  # fmt: skip
                        self.path.unlink(missing_ok=True)
                        continue
                    where = "this host" if same_host else f"host {holder['host']}"
                    raise VrwkvError(f"{self.path}: the folder is in use by process {holder['pid']} on {where}",
                                     hint="wait for that run to end, or choose another out_dir"
                                     + ("" if same_host else "; if that run is gone, delete the .lock file")) from None  # fmt: skip
            raise VrwkvError(f"{self.path}: could not take the lock (another run keeps taking it)")
        finally:
            tmp.unlink(missing_ok=True)

    def _create(self, tmp: Path) -> None:
        """Creates the lock with its content, failing with FileExistsError if one exists."""
        try:
            os.link(tmp, self.path)  # create-with-content in one step
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: exclusive create, then write
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.mine) + "\n")

    def release(self) -> None:
        if self.held and _read_lock(self.path) == self.mine:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.held = False

    def __enter__(self) -> "OutDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
