"""`vrwkv download`: fetch released checkpoints, vision towers and data sets by name.

    vrwkv download visualrwkv-v0700-0b1                 # into the huggingface_hub cache
    vrwkv download rwkv7-world-1b5 --dir models         # into models/rwkv7-world-1b5/
    vrwkv download --list                               # every name, its size and local status
    vrwkv download --verify rwkv7-world-0b1             # re-hash what is on disk (offline)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from vrwkv_core.progress import Progress

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _ByteProgress(Progress):
    """Progress in bytes (size, speed, time left) on stderr, one bar per file."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress as RichProgress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from vrwkv_cli.common import err_console

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
        )
        self._task: Any = None

    def start(self, description: str, total: int | None = None) -> None:
        if self._task is None:
            self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def update(self, advance: int = 1, **fields: Any) -> None:
        if self._task is not None:
            self._bar.update(self._task, advance=advance)

    def log(self, message: str) -> None:
        self._bar.console.print(message)

    def close(self) -> None:
        if self._task is not None:
            self._bar.stop()
            self._task = None


def _list(dir: Optional[Path]) -> None:  # noqa: A002
    from rich.table import Table

    from vrwkv_cli.common import console
    from vrwkv_core.hub import list_artifacts, local_status
    from vrwkv_core.hub.fetch import human_size

    table = Table(title="vrwkv artifacts" + (f" in {dir}" if dir else "") + " (sizes approximate)")
    table.add_column("name", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("local status")
    table.add_column("source", overflow="fold")
    for art in list_artifacts():
        source = art.repo_id or "not on the hub"
        table.add_row(art.name, art.kind, human_size(art.size), local_status(art.name, dir), source)
    console.print(table)


# A single command, not a callback: a click group would stop parsing options at the first
# name, so `vrwkv download NAME --dir DIR` would read `--dir` as a name.
@app.command()
def download(
    names: Optional[list[str]] = typer.Argument(
        None, help="Artifact names, e.g. visualrwkv-v0700-0b1 rwkv7-world-1b5 (see --list).", show_default=False),
    dir: Optional[Path] = typer.Option(  # noqa: A002
        None, "--dir", help="Put files in DIR/<name>/ instead of the huggingface_hub cache "
        "(HF_HOME). Use a disk with room: the 7B checkpoints are ~16 GB."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit to fetch."),
    list_: bool = typer.Option(False, "--list", help="List every known artifact with its size and local status."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash the named artifacts on disk (works offline)."),
    force: bool = typer.Option(False, "--force", help="Download again even if present (e.g. after a mismatch)."),
) -> None:
    """Download released checkpoints, vision towers and data sets by name, sha256-verified.

    Honours HF_TOKEN (gated repos), HF_HUB_OFFLINE (cache only) and HF_ENDPOINT (mirrors).
    An interrupted download is never mistaken for a complete one: run the command again.

    Example: vrwkv download visualrwkv-v0700-0b1 --dir models
    """
    from vrwkv_cli.common import console
    from vrwkv_core.errors import DownloadError

    if list_:
        _list(dir)
        return
    if not names:
        raise typer.BadParameter("name at least one artifact (or use --list)", param_hint="NAMES")
    from vrwkv_core import hub

    for name in names:
        progress = _ByteProgress()
        try:
            if verify:
                report = hub.verify(name, dir=dir, progress=progress)
            else:
                path = hub.download(name, dir=dir, revision=revision, progress=progress, force=force)
        finally:
            progress.close()
        if not verify:
            console.print(f"{name}: {path}", highlight=False, soft_wrap=True)
            continue
        for check in report.files:
            console.print(check.describe(), highlight=False, soft_wrap=True)
        if not report.ok:
            bad = next(c for c in report.files if not c.ok)
            raise DownloadError(f"{report.name}: verification failed: {bad.describe()}",
                                hint=f"run `vrwkv download {report.name} --force` to fetch it again")
