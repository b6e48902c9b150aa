"""Resumable checkpoints: atomic writes, the previous one kept, a sha256 manifest, resume checks.

A stage's out_dir holds `last.ckpt` (newest), `prev.ckpt` (the one before) and
`checkpoints.json`, whose entries name each file's training step, sha256 and the resolved
recipe that wrote it. A save goes:

    .last.ckpt.tmp written and fsynced  ->  manifest lists its sha256 (and the current last's)
    ->  last.ckpt renamed to prev.ckpt  ->  .last.ckpt.tmp renamed to last.ckpt

so a process killed at any moment leaves at least one file whose sha256 the manifest
lists. `find_resumable` takes the newest such file and says when it had to fall back.
DeepSpeed writes a folder instead of a file: its hash covers every file in it, sorted by
relative path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vrwkv_core.errors import CheckpointError, RecipeError
from vrwkv_core.fsutil import atomic_write_text, fsync_dir, fsync_tree

if TYPE_CHECKING:
    import pytorch_lightning as pl

LAST, PREV, MANIFEST = "last.ckpt", "prev.ckpt", "checkpoints.json"
# Test hook: seconds to sleep after the temp checkpoint is written, before it is renamed in
# (the kill-during-write test widens its window with it).
PAUSE_ENV = "VRWKV_TEST_SAVE_PAUSE_S"
# Keys that may differ on resume without changing the model's shapes.
_MODEL_KEYS_FREE = ("model.rwkv.checkpoint", "model.vision.checkpoints.")


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative path and bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_manifest(out_dir: Path) -> list[dict[str, Any]] | None:
    """The manifest's entries; None when there is no readable manifest."""
    path = out_dir / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["checkpoints"]
        return [e for e in entries if isinstance(e, dict) and {"file", "step", "sha256"} <= e.keys()]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(out_dir: Path, entries: list[dict[str, Any]]) -> None:
    """Atomically (temp + fsync + rename) writes checkpoints.json."""
    atomic_write_text(out_dir / MANIFEST, json.dumps({"format": 1, "checkpoints": entries}, indent=1))


class CheckpointWriter:
    """Writes last.ckpt atomically, keeps prev.ckpt, and maintains the manifest (rank 0 only).

    `entries` are the checkpoints known to be intact (from `find_resumable` on resume, empty
    on a fresh run, so a stale file of an earlier run is replaced, never kept as prev).
    """

    def __init__(self, out_dir: Path, entries: list[dict[str, Any]] | None = None) -> None:
        self.out_dir = out_dir
        self.entries = list(entries or [])

    def save(self, trainer: "pl.Trainer", step: int, recipe: dict[str, Any]) -> None:
        """Every rank calls this (DeepSpeed writes shards from each rank)."""
        tmp = self.out_dir / f".{LAST}.tmp"
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # a stale temp from a killed save
        trainer.strategy.barrier("vrwkv_checkpoint_start")
        trainer.save_checkpoint(str(tmp), weights_only=False)
        trainer.strategy.barrier("vrwkv_checkpoint_written")
        if trainer.is_global_zero:
            self._commit(tmp, step, recipe)

    def _commit(self, tmp: Path, step: int, recipe: dict[str, Any]) -> None:
        last, prev = self.out_dir / LAST, self.out_dir / PREV
        fsync_tree(tmp)
        new = {"file": LAST, "step": int(step), "sha256": sha256_of(tmp), "time": time.time(), "recipe": recipe}
        old_last = next((e for e in self.entries if e["file"] == LAST), None)
        old_prev = next((e for e in self.entries if e["file"] == PREV), None)
        keep_prev = old_last is not None and last.exists()
        kept = dict(old_last, file=PREV) if keep_prev else old_prev
        # The manifest first: it lists the current last (by sha256) until both renames are done.
        self.entries = [new] + ([kept] if kept else [])
        write_manifest(self.out_dir, self.entries)
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        if pause > 0:
            time.sleep(pause)
        if keep_prev:
            _remove(prev)
            os.replace(last, prev)
        else:
            if not old_prev:
                _remove(prev)  # not ours, or damaged: never resumed from
            _remove(last)
        os.replace(tmp, last)
        fsync_dir(self.out_dir)


def find_resumable(out_dir: Path) -> tuple[Path, dict[str, Any] | None, list[str]]:
    """(checkpoint to resume from, its manifest entry, warnings) or a CheckpointError.

    Takes the newest of last.ckpt / prev.ckpt whose sha256 the manifest lists. Without a
    readable manifest, the newest that loads completely (every zip member's CRC, then
    torch.load) and holds everything a resume needs.
    """
    last, prev = out_dir / LAST, out_dir / PREV
    entries = read_manifest(out_dir)
    if entries is None:
        return _resumable_without_manifest(out_dir)
    by_sha = {e["sha256"]: e for e in entries}
    warnings: list[str] = []
    found: list[tuple[Path, dict[str, Any]]] = []
    newest = max((int(e["step"]) for e in entries), default=-1)
    for path in (last, prev):
        if not path.exists():
            continue
        entry = by_sha.get(sha256_of(path))
        if entry is None:
            warnings.append(f"{path.name} is damaged or incomplete (its sha256 is not in {MANIFEST})")
            continue
        entry = dict(entry, file=path.name)  # a save killed between its renames moved it
        found.append((path, entry))
        if path == last and int(entry["step"]) >= newest:
            break  # the newest listed checkpoint is intact: no need to hash the older one
    if not found:
        if not last.exists() and not prev.exists():
            raise CheckpointError(f"{last}: nothing to resume", hint="drop --resume to start fresh")
        raise CheckpointError(f"{out_dir}: no intact checkpoint ({LAST} and {PREV} fail their sha256 check)",
                              hint="drop --resume to start fresh")  # fmt: skip
    path, entry = max(found, key=lambda pe: int(pe[1]["step"]))
    if path != last:
        warnings.append(f"falling back to {path.name} (step {entry['step']})")
    return path, entry, warnings


RESUME_KEYS = ("state_dict", "optimizer_states", "global_step", "loops", "callbacks")


def complete_checkpoint(path: Path) -> tuple[int | None, str]:
    """(training step, "") when `path` loads completely and can be resumed, else (None, why)."""
    import zipfile

    import torch

    if path.is_dir():  # a DeepSpeed folder: no checksums inside to test
        return (0, "") if any(path.iterdir()) else (None, "an empty folder")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        if bad is not None:
            return None, f"member {bad} fails its CRC check"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zipfile, pickle and torch each raise their own types
        return None, f"does not load ({type(err).__name__})"
    if not isinstance(ckpt, dict):
        return None, "not a training checkpoint"
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        return None, f"lacks {', '.join(missing)}"
    return int(ckpt["global_step"]), ""


def _resumable_without_manifest(out_dir: Path) -> tuple[Path, None, list[str]]:
    """The newer complete checkpoint of last/prev when checkpoints.json cannot be read."""
    warnings = [f"{out_dir / MANIFEST} is missing or unreadable: checking the checkpoints by loading them"]
    found: list[tuple[int, Path]] = []
    for path in (out_dir / LAST, out_dir / PREV):
        if not path.exists():
            continue
        step, why = complete_checkpoint(path)
        if step is None:
            warnings.append(f"skipped {path.name}: {why}")
        else:
            found.append((step, path))
    if not found:
        if not (out_dir / LAST).exists() and not (out_dir / PREV).exists():
            raise CheckpointError(f"{out_dir / LAST}: nothing to resume", hint="drop --resume to start fresh")
        raise CheckpointError(f"{out_dir}: no intact checkpoint ({'; '.join(warnings[1:])})",
                              hint="drop --resume and pass --overwrite to start fresh")
    step, path = max(found, key=lambda sp: sp[0])
    if path.name != LAST:
        warnings.append(f"falling back to {path.name} (step {step})")
    return path, None, warnings


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def recipe_drift(saved: dict[str, Any], current: dict[str, Any], stage: str) -> list[str]:
    """Lines `key: old -> new` for every key that changed; a RecipeError if the model's did.

    The model section decides the shapes of the weights and optimizer states in the
    checkpoint, so a change there cannot resume; anything else is reported and allowed.
    """
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    lines = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed]
    model = [line for k, line in zip(changed, lines) if k.startswith("model.") and not k.startswith(_MODEL_KEYS_FREE)]
    if model:
        raise RecipeError(
            f"--resume: the model differs from the checkpoint's ({'; '.join(model[:4])}"
            + (f"; +{len(model) - 4} more" if len(model) > 4 else "") + ")",
            hint=f"resume with the recipe that wrote the checkpoint, or start fresh without --resume (another {stage}.out_dir)",
        )
    return lines
