"""`vrwkv bench`: speed measured side by side in one process, printed as ratios."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from vrwkv_cli.common import QuantOpt

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Measure speed side by side (ratios in one run).")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON line instead of a table.")]
ThreadsOpt = Annotated[int, typer.Option(help="torch CPU threads.")]


class Clock(str, Enum):
    wall = "wall"
    cpu = "cpu"


@app.command()
def wkv(
    batch: Annotated[int, typer.Option("--batch", "-B")] = 1,
    heads: Annotated[int, typer.Option("--heads", "-H")] = 12,
    length: Annotated[int, typer.Option("--length", "-T")] = 1024,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """WKV-7 kernels: chunked (and CUDA when present) vs the sequential loop, fp32.

    Example: vrwkv bench wkv -T 1024
    """
    from vrwkv_cli.common import print_rows
    from vrwkv_core.bench.wkv import run_wkv_bench

    rows = run_wkv_bench(B=batch, H=heads, T=length, threads=threads)
    print_rows(rows, f"WKV-7 B={batch} H={heads} T={length} N=64", as_json)


@app.command()
def lm(
    threads: ThreadsOpt = 2,
    length: Annotated[int, typer.Option("--length", "-T", help="Prefill length.")] = 512,
    decode_tokens: Annotated[int, typer.Option(help="Tokens to decode.")] = 64,
    bf16: Annotated[bool, typer.Option("--bf16", help="Add bf16-weights rows.")] = False,
    rwkv6: Annotated[bool, typer.Option("--rwkv6", help="Add RWKV-6 1.6B-shape rows (needs ~13 GB RAM).")] = False,
    clock: Annotated[Clock, typer.Option(
        help="What the RWKV-7 rows time: wall (elapsed) or cpu (process CPU time; steadier on a busy "
             "shared machine, with --threads 1).")] = Clock.wall,  # fmt: skip
    as_json: JsonOpt = False,
    wkv_backend: Annotated[str, typer.Option("--wkv-backend", help="WKV kernel of our prefill: auto, chunked, cuda, fla or reference.")] = "auto",
    quant: Annotated[Optional[list[str]], typer.Option(
        "--quant", help="Add rows for these weight formats (repeatable): fp16, int8, int4.")] = None,
    batch: Annotated[int, typer.Option(help="Add an fp32 batch-B aggregate decode row (0: none).")] = 0,
    rss: Annotated[bool, typer.Option("--rss", help="Add the peak RSS of load + decode per format (a process each).")] = False,
    all_rows: Annotated[bool, typer.Option("--all", help="Everything: --bf16 --quant fp16 --quant int8 --quant int4 "
                                                          "--batch 8 --rss.")] = False,
) -> None:
    """RWKV-7 0.1B shape: prefill and decode tokens/s, ours vs the `rwkv` package.

    Example: vrwkv bench lm --all   (on a busy machine: vrwkv bench lm --all --threads 1 --clock cpu)
    """
    from vrwkv_cli.common import print_rows
    from vrwkv_core.bench.lm import run_lm_bench

    from vrwkv_core.errors import VrwkvError

    quant = list(quant or (["fp16", "int8", "int4"] if all_rows else []))
    bad = [q for q in quant if q not in ("fp16", "int8", "int4")]
    if bad:
        raise VrwkvError(f"--quant {bad[0]}: not one of fp16, int8, int4")
    if batch < 0 or batch == 1:
        raise VrwkvError(f"--batch must be 0 (no batch row) or >= 2, got {batch}")
    rows = run_lm_bench(threads=threads, T=length, decode_tokens=decode_tokens, bf16=bf16 or all_rows,
                        clock=clock.value, wkv_backend=wkv_backend, quant=quant, batch=batch or (8 if all_rows else 0),
                        rss=rss or all_rows)  # fmt: skip
    print_rows(rows, "RWKV-7 L12 D768 random weights", as_json)
    if rwkv6:
        from vrwkv_core.bench.lm6 import run_rwkv6_bench

        print_rows(run_rwkv6_bench(threads=threads, bf16=bf16), "RWKV-6 L24 D2048 random weights", as_json)


@app.command()
def generate(threads: ThreadsOpt = 2, as_json: JsonOpt = False, quant: QuantOpt = None) -> None:
    """RNN-mode generation vs re-encoding the sequence per token; image-state cache.

    Example: vrwkv bench generate
    """
    from vrwkv_cli.common import print_rows
    from vrwkv_core.bench.generate import run_generate_bench

    rows = run_generate_bench(threads=threads, quant=quant)
    print_rows(rows, "generation", as_json)
