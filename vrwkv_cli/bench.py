"""`vrwkv bench`: speed measured side by side in one process, printed as ratios."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from vrwkv_cli.common import QuantOpt

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Measure speed side by side (ratios in one run).")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON line instead of a table.")]
ThreadsOpt = Annotated[int, typer.Option(help="torch CPU threads.", min=1)]


class Clock(str, Enum):
    wall = "wall"
    cpu = "cpu"


@app.command()
def wkv(
    batch: Annotated[int, typer.Option("--batch", "-B", min=1)] = 1,
    heads: Annotated[int, typer.Option("--heads", "-H", min=1)] = 12,
    length: Annotated[int, typer.Option("--length", "-T", min=1)] = 1024,
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
    length: Annotated[int, typer.Option("--length", "-T", help="Prefill length.", min=1)] = 512,
    decode_tokens: Annotated[int, typer.Option(help="Tokens to decode.", min=1)] = 64,
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


@app.command()
def serve(
    threads: ThreadsOpt = 2,
    layers: Annotated[int, typer.Option(help="Layers of the random model.")] = 12,
    embd: Annotated[int, typer.Option(help="Width of the random model.")] = 768,
    vocab: Annotated[int, typer.Option(help="Vocabulary of the random model.")] = 65536,
    clients: Annotated[str, typer.Option(help="Concurrent clients to measure, comma-separated.")] = "1,4,16",
    decode_tokens: Annotated[int, typer.Option(help="Tokens each client asks for.")] = 32,
    conversation: Annotated[int, typer.Option(help="Tokens of the conversation before the follow-up turn.")] = 2000,
    device: Annotated[str, typer.Option(help="cpu or cuda (fp32).")] = "cpu",
    clock: Annotated[Clock, typer.Option(
        help="wall (elapsed) or cpu (process CPU time, all threads; steadier on a busy shared machine, "
             "with --threads 1).")] = Clock.wall,  # fmt: skip
    fast_batch: Annotated[bool, typer.Option(help="CPU fp32: the packed route, as `vrwkv serve` by default.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """The serving engine: decode tokens/s at 1, 4, 16 concurrent clients; follow-up TTFT with the
    state cache vs re-prefilling the conversation (0.1B shape, random weights).

    Example: vrwkv bench serve   (on a busy machine: vrwkv bench serve --threads 1 --clock cpu)
    """
    from vrwkv_cli.common import print_rows
    from vrwkv_core.bench.serve import run_serve_bench
    from vrwkv_core.errors import VrwkvError

    try:
        ks = tuple(int(k) for k in clients.split(","))
    except ValueError:
        raise VrwkvError(f"--clients {clients!r}: give comma-separated numbers, e.g. 1,4,16") from None
    rows = run_serve_bench(threads=threads, n_layer=layers, n_embd=embd, vocab_size=vocab, clients=ks,
                           decode_tokens=decode_tokens, conversation=conversation, device=device,
                           clock=clock.value, fast_batch=fast_batch)  # fmt: skip
    print_rows(rows, f"serve engine L{layers} D{embd} random weights", as_json)


@app.command()
def train(
    n_layer: Annotated[int, typer.Option(help="LM blocks (0.1B: 12).")] = 12,
    n_embd: Annotated[int, typer.Option(help="LM width (0.1B: 768).")] = 768,
    vocab: Annotated[int, typer.Option(help="Vocabulary size (World: 65536).")] = 65536,
    length: Annotated[int, typer.Option("--length", "-T", help="Tokens per sample.")] = 512,
    batch: Annotated[int, typer.Option("--batch", "-B", help="Samples per step.")] = 1,
    steps: Annotated[int, typer.Option(help="Timed steps per method (after one warm-up step).")] = 2,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 64,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 128.0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    grad_checkpoint: Annotated[bool, typer.Option(
        help="Recompute each block in backward, as hardware.grad_checkpoint=true (what a small GPU runs); "
             "--no-grad-checkpoint keeps every block's activations.")] = True,
    labelled: Annotated[float, typer.Option(
        min=0.01, max=1.0, help="Share of each sample that is the answer (the loss positions; the head runs only there).")] = 0.25,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Full finetune vs LoRA vs state tuning of the LM alone: trainable parameters, peak memory, step time.

    Example: vrwkv bench train   (tiny: vrwkv bench train --n-layer 2 --n-embd 128 --vocab 1000 -T 32)
    """
    from vrwkv_cli.common import print_rows
    from vrwkv_core.bench.train import run_train_bench

    rows = run_train_bench(n_layer=n_layer, n_embd=n_embd, vocab=vocab, T=length, batch=batch, steps=steps,
                           rank=rank, alpha=alpha, threads=threads, device=device, grad_checkpoint=grad_checkpoint,
                           labelled=labelled)  # fmt: skip
    ckpt = "grad checkpointing" if grad_checkpoint else "no grad checkpointing"
    print_rows(rows, f"training step, RWKV-7 L{n_layer} D{n_embd} V{vocab}, B={batch} T={length}, LoRA r{rank}, "
                     f"{ckpt}, loss on the last {labelled:.0%}", as_json)  # fmt: skip
