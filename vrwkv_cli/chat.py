"""`vrwkv chat`: talk about an image with a VisualRWKV model in RNN mode.

Interactive by default (answers stream as they are generated); `--prompt` answers once
and exits with only the answer on stdout (`--json`: one JSON line with answer and
timings). Input: a line ending with a backslash continues on the next line; anything
else is sent. Commands: /image PATH, /reset, /save PATH, /load PATH, /retry, /help,
/quit. Ctrl-C stops the current answer; Ctrl-D (end of input) or /quit leaves.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from vrwkv_cli.common import AdapterOpt, MergeAdapterOpt, PrefillPadOpt, QuantOpt, StateOpt, WkvBackendOpt

if TYPE_CHECKING:
    from rich.console import Console

    from vrwkv_core.infer import ChatSession, Generation

app = typer.Typer(add_completion=False)

HELP = """\
Type a question and press Enter. End a line with \\ to continue on the next line.
  /image PATH   add an image to the next question
  /reset        start a new conversation (keeps its images and the image cache)
  /save PATH    save the conversation state (PATH and PATH.json)
  /load PATH    restore a saved conversation
  /retry        answer the last question again
  /help         this help
  /quit         leave (also Ctrl-D)
Ctrl-C stops an answer in progress."""


@app.command()
def chat(
    model: Annotated[str, typer.Option("--model", "-m", help="Our output dir, a released .pth, or a registry name.")],
    image: Annotated[Optional[list[str]], typer.Option("--image", "-i", help="Image file (repeatable).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Answer this once and exit.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32 or bf16.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.", min=1)] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: all).")] = 0,
    presence_penalty: Annotated[float, typer.Option(help="Penalty for tokens already in the answer.")] = 0.0,
    frequency_penalty: Annotated[float, typer.Option(help="Penalty per (decayed) repeat; try 0.3 against loops.")] = 0.0,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Show tokens/s and time to first token.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --prompt: one JSON line with answer and timings.")] = False,
    download: Annotated[bool, typer.Option("--download", help="Fetch a registry model if it is not on disk.")] = False,
    wkv_backend: WkvBackendOpt = None,
    prefill_pad: PrefillPadOpt = True,
    adapter: AdapterOpt = None,
    state: StateOpt = None,
    merge_adapter: MergeAdapterOpt = False,
    quant: QuantOpt = None,
) -> None:
    """Chat about an image (interactive), or answer one --prompt and exit.

    Interactive: end a line with a backslash to continue it on the next line; /help lists
    the commands (/image PATH, /reset, /save PATH, /load PATH, /retry, /quit); Ctrl-C
    stops an answer, Ctrl-D leaves.

    Example: vrwkv chat --model out/tiny/finetune --image cat.png --prompt "What color is the circle?"
    """
    import time

    from rich.markup import escape

    from vrwkv_cli.common import console, err_console
    from vrwkv_core.errors import VrwkvError

    if as_json and prompt is None:
        raise VrwkvError("--json needs --prompt", hint='e.g. --prompt "What is in the image?" --json')
    if prompt is not None and not prompt.strip():
        raise VrwkvError("empty prompt: --prompt needs a question")
    from vrwkv_core.infer import ChatSession, GenerationConfig, context_length, load_image, load_model

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              stop_strings=tuple(stop or ()), seed=seed)  # fmt: skip
    one_shot = prompt is not None
    images = []
    for path in image or []:
        try:
            images.append(load_image(path))
        except VrwkvError as err:
            if one_shot:
                raise
            _print_error(err_console, err)
    t0 = time.perf_counter()
    with err_console.status(f"loading {escape(model)}", spinner="dots") if not one_shot else _nothing():
        vlm = load_model(model, device=device, dtype=dtype, download=download, wkv_backend=wkv_backend,
                         adapter=adapter, state=state, merge_adapter=merge_adapter, quant=quant)
    load_s = time.perf_counter() - t0
    session = ChatSession(vlm, config=config, ctx_len=context_length(model), prefill_pad=prefill_pad)
    for im in images:
        session.add_image(im)
    if one_shot:
        _answer_once(session, prompt, as_json, stats, load_s)
        return
    console.print(f"[bold]vrwkv chat[/] {escape(model)} on {vlm.device} ({str(vlm.dtype).removeprefix('torch.')}), "
                  f"{len(images)} image(s). /help for commands.")  # fmt: skip
    _interactive(session, console, err_console, stats)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _print_error(err_console: Console, err: Exception) -> None:
    from rich.markup import escape

    err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    hint = getattr(err, "hint", None)
    if hint:
        err_console.print(f"hint: {hint}", highlight=False, markup=False, soft_wrap=True)


def _answer_once(session: ChatSession, prompt: str, as_json: bool, stats: bool, load_s: float) -> None:
    """--prompt: the answer alone on stdout (or one JSON line)."""
    import warnings

    from vrwkv_cli.common import err_console
    from vrwkv_core.infer import ContextLengthWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ContextLengthWarning)
        gen = session.ask(prompt)
        for piece in gen:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    for w in caught:
        err_console.print(f"warning: {w.message}", highlight=False, markup=False, soft_wrap=True)
    result = gen.result
    if as_json:
        print(json.dumps({"answer": result.text, **result.timings(), "load_s": round(load_s, 3)}, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    if stats:
        err_console.print(_stats_line(result), highlight=False, markup=False)


def _stats_line(result: Any) -> str:
    parts = [f"{result.n_new_tokens} tokens"]
    if result.ttft_s is not None:
        parts.append(f"first token {result.ttft_s * 1000:.0f} ms")
    if result.tokens_per_s is not None:
        parts.append(f"{result.tokens_per_s:.1f} tokens/s")
    parts.append(result.finish_reason)
    return "[" + ", ".join(parts) + "]"


def _read_message(console: Console) -> str:
    """One message: lines ending with a backslash continue it."""
    lines = []
    prompt = "[bold green]you>[/] "
    while True:
        line = console.input(prompt)
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = "[green]...[/] "
            continue
        lines.append(line)
        return "\n".join(lines)


def _interactive(session: ChatSession, console: Console, err_console: Console, stats: bool) -> None:
    from vrwkv_core.errors import VrwkvError

    while True:
        try:
            text = _read_message(console)
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print()
            continue
        stripped = text.strip()
        try:
            if stripped.startswith("/"):
                if _command(session, stripped, console, stats) == "quit":
                    return
                continue
            if not stripped:
                console.print("[dim]empty prompt: type a question (/help for commands)[/]")
                continue
            _stream(lambda: session.ask(text), console, err_console, stats)
        except (VrwkvError, OSError) as err:  # a bad /save or /image path must not end the session
            _print_error(err_console, err)


def _command(session: ChatSession, line: str, console: Console, stats: bool = False) -> str | None:
    """Runs one /command; returns "quit" to leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return "quit"
    if name == "/help":
        console.print(HELP, markup=False, highlight=False)
    elif name == "/image":
        if not arg:
            console.print("usage: /image PATH")
        else:
            session.add_image(arg)
            console.print(f"[dim]image added ({session.queued_images} queued for the next question)[/]")
    elif name == "/reset":
        session.reset()
        n = session.queued_images
        console.print(f"[dim]new conversation{f' ({n} image(s) kept)' if n else ''}[/]")
    elif name == "/save":
        if not arg:
            console.print("usage: /save PATH")
        else:
            meta = session.save_state(arg)
            console.print(f"saved {arg} and {meta}", style="dim", highlight=False, markup=False)
    elif name == "/load":
        if not arg:
            console.print("usage: /load PATH")
        else:
            session.load_state(arg)
            console.print(f"loaded {arg}: {len(session.turns)} turn(s)", style="dim", highlight=False, markup=False)
    elif name == "/retry":
        from vrwkv_cli.common import err_console

        _stream(session.retry, console, err_console, stats)
    else:
        console.print(f"unknown command {name}; /help lists them", highlight=False, markup=False)
    return None


def _stream(start: Callable[[], Generation], console: Console, err_console: Console, stats: bool) -> None:
    """Starts an answer and prints it as it is generated; Ctrl-C stops it (the session keeps
    what was said; during the prompt's prefill it drops the question)."""
    import warnings

    from vrwkv_core.infer import ContextLengthWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ContextLengthWarning)
        try:
            gen = start()
        except KeyboardInterrupt:
            console.print("[dim]\\[stopped][/]")
            return
        console.print("[bold cyan]assistant>[/] ", end="")
        try:
            for piece in gen:
                console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            gen.close()
            console.print(" [dim]\\[stopped][/]", end="")
    console.print()
    for w in caught:
        err_console.print(f"warning: {w.message}", highlight=False, markup=False, soft_wrap=True)
    if stats:
        console.print(_stats_line(gen.result), style="dim", highlight=False, markup=False)
