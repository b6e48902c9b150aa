"""Pieces every subcommand shares: the Rich consoles, a Rich-backed Progress, table output."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from vrwkv_core.progress import Progress

WkvBackendOpt = Annotated[Optional[str], typer.Option(
    "--wkv-backend", help="WKV kernel: auto, chunked, cuda, fla (flash-linear-attention: pip install -e '.[fla]') "
                          "or reference (the slow loop); default: the model's model.rwkv.wkv_backend.")]  # fmt: skip

QuantOpt = Annotated[Optional[str], typer.Option(
    "--quant", help="Weight-only quantization of the language model: fp16, int8 or int4 (faster CPU decoding, "
                    "less memory; activations keep --dtype). Default: as stored.")]  # fmt: skip

PrefillPadOpt = Annotated[bool, typer.Option(
    "--prefill-pad/--no-prefill-pad", help="Pad the first prompt of a conversation as the model's release did "
                                            "(v7.00: token 261 to a multiple of 16).")]  # fmt: skip
AdapterOpt = Annotated[Optional[str], typer.Option(
    "--adapter", help="A peft run dir (LoRA/PiSSA/MiSS or state tuning) trained on --model; applied without merging.")]
StateOpt = Annotated[Optional[str], typer.Option(
    "--state", help="A state file (a state-tuning run's state.safetensors): every prompt starts from it.")]
MergeAdapterOpt = Annotated[bool, typer.Option(
    "--merge-adapter", help="Fold --adapter into the weights in memory (faster decoding, same answers).")]

console = Console()
err_console = Console(stderr=True)


class RichProgress(Progress):
    """vrwkv_core.progress.Progress drawn as a Rich progress bar on stderr."""

    def __init__(self, transient: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress as _RichProgress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = _RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=err_console,
            transient=transient,
        )
        self._task: Any = None

    def start(self, description: str, total: int | None = None) -> None:
        if self._task is None:
            self._bar.start()
        else:
            self._bar.stop_task(self._task)
        self._task = self._bar.add_task(description, total=total, info="")

    def update(self, advance: int = 1, **fields: Any) -> None:
        if self._task is None:
            return
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        self._bar.update(self._task, advance=advance, info=info)

    def log(self, message: str) -> None:
        self._bar.console.print(message) if self._task is not None else err_console.print(message)

    def close(self) -> None:
        if self._task is not None:
            self._bar.stop()
            self._task = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_rows(rows: list[dict[str, Any]], title: str, as_json: bool = False) -> None:
    """Prints result rows as a Rich table, or as one JSON line with --json."""
    if as_json:
        print(json.dumps({"title": title, "rows": rows}))
        return
    table = Table(title=title)
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    for col in columns:
        table.add_column(col, overflow="fold")  # a narrow terminal folds values, never cuts them to "…"
    for row in rows:
        table.add_row(*(_fmt(row.get(col, "")) for col in columns))
    if console.is_terminal:
        console.print(table)
        return
    # Piped or logged output has no width to fit: print the table at its natural width.
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(file=console.file, width=max(width, console.width)).print(table)
