"""`vrwkv prepare-data`: check LLaVA data, extract image archives, make synthetic shapes.

    vrwkv prepare-data llava --json blip_laion_cc_sbu_558k.json --image-folder data/images --out data/pretrain
    vrwkv prepare-data extract images.zip --out data/images
    vrwkv prepare-data synthetic-shapes --out data/shapes
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from vrwkv_cli.common import RichProgress, console, err_console
from vrwkv_core.errors import DataError

app = typer.Typer(
    name="prepare-data",
    help="Prepare training data: check LLaVA files, extract archives, make the synthetic shapes set.",
    no_args_is_help=True,
    add_completion=False,
)
def _print_prepare_summary(report: Any) -> None:
    s = report.stats
    table = Table(title=f"prepare-data llava -> {report.out_dir}", show_header=False)
    table.add_row("records", str(s["records"]))
    table.add_row("accepted", str(s["accepted"]))
    table.add_row("rejected", f"{s['rejected']} ({s['reject_fraction']:.2%})")
    for reason, n in s["reject_reasons"].items():
        table.add_row(f"  {reason}", str(n))
    table.add_row("images", str(s["images"]))
    if s.get("rounds"):
        r = s["rounds"]
        table.add_row(f"rounds (max {r['max_rounds']})", f"{r['source_records']} records -> {r['records_out']} "
                      f"({r['pairs_dropped']} empty rounds, {r['records_dropped']} records dropped)")
    if s["lengths"]:
        L = s["lengths"]
        table.add_row(f"length ({s['length_unit']})", f"p50 {L['p50']:g}  p90 {L['p90']:g}  p99 {L['p99']:g}  max {L['max']}")
    if s["over_ctx_len"] is not None:
        table.add_row(f"over ctx_len {s['ctx_len']}", str(s["over_ctx_len"]))
    table.add_row("speed", f"{s['records_per_s']} records/s ({s['workers']} workers, {s['seconds']} s)")
    console.print(table)


@app.command("llava")
def llava(
    json_file: Annotated[Path, typer.Option("--json", help="LLaVA data: a JSON array or JSONL of {id, image, conversations}.")],
    image_folder: Annotated[Path, typer.Option("--image-folder", help="Folder the records' image paths are relative to.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: data.jsonl, rejects.jsonl, stats.json, lengths.png.")],
    max_reject_fraction: Annotated[float, typer.Option(help="Exit non-zero (after writing the report) when more records than this are rejected.")] = 0.01,
    tokens_per_image: Annotated[Optional[int], typer.Option(help="Count tokens with this many placeholders per image (1024 for the released models).")] = None,
    ctx_len: Annotated[Optional[int], typer.Option(help="Also count records longer than this (needs --tokens-per-image).")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes checking records and decoding images (default: the CPU count, at most 8).", show_default=False, min=1)] = min(8, os.cpu_count() or 1),
    shuffle_seed: Annotated[Optional[int], typer.Option(help="Write data.jsonl in a seeded random order instead of source order.")] = None,
    max_rounds: Annotated[Optional[int], typer.Option(help="The original's passes: drop rounds with an empty answer, split records into chunks of at most N rounds (v7.00 0.1B: 5; v6.0: 10 with --no-readd-instruction).", min=1)] = None,
    readd_instruction: Annotated[bool, typer.Option("--readd-instruction/--no-readd-instruction", help="With --max-rounds: append the short-answer instruction to later chunks' first question when the record's first had it (v7.00).")] = True,
) -> None:
    """Check every record and image of a LLaVA file; write the good records and a report.

    Example: vrwkv prepare-data llava --json llava_v1_5_mix665k.json --image-folder data/images --out data/finetune
    """
    from vrwkv_core.data.prepare import prepare_llava

    try:
        report = prepare_llava(json_file, image_folder, out, max_reject_fraction=max_reject_fraction,
                               tokens_per_image=tokens_per_image, ctx_len=ctx_len, workers=workers,
                               shuffle_seed=shuffle_seed, progress=RichProgress(),
                               max_rounds=max_rounds, readd_instruction=readd_instruction)
    except DataError as err:
        if getattr(err, "report", None) is not None:
            _print_prepare_summary(err.report)  # type: ignore[attr-defined]
        raise
    _print_prepare_summary(report)


@app.command("extract")
def extract(
    archive: Annotated[Path, typer.Argument(help="A .zip or .tar(.gz/.bz2/.xz) archive.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to extract into (created if missing).")],
) -> None:
    """Extract an archive safely; re-running skips files already extracted with the right size.

    Example: vrwkv prepare-data extract images.zip --out data/images
    """
    from vrwkv_core.data.archive import extract_archive

    report = extract_archive(archive, out, progress=RichProgress())
    console.print(f"{archive} -> {out}: {report.extracted} extracted, {report.skipped} already there, "
                    f"{report.bytes_written / 1e6:.1f} MB written")
    if report.refused:
        raise DataError(f"{archive}: {report.refused_summary()}", hint="everything else was extracted")


@app.command("synthetic-shapes")
def synthetic_shapes(
    out: Annotated[Path, typer.Option("--out", help="Output folder (recipes/tiny.yaml uses data/shapes).")],
    train: Annotated[int, typer.Option(help="Training images (each gets a caption and two questions).", min=1)] = 2000,
    eval_: Annotated[int, typer.Option("--eval", help="Held-out images for the `shapes` benchmark (one question each).", min=0)] = 200,
    seed: Annotated[int, typer.Option(help="Same seed and sizes give byte-identical files.")] = 0,
) -> None:
    """Write the synthetic shapes set: images, pretrain/finetune records and the `shapes` benchmark.

    Example: vrwkv prepare-data synthetic-shapes --out data/shapes --train 2000 --eval 200
    """
    from vrwkv_core.data.shapes import prepare_shapes

    path = prepare_shapes(out, n_train=train, n_eval=eval_, seed=seed, progress=RichProgress())
    console.print(f"wrote {train} training and {eval_} eval images with their records to {path}")
