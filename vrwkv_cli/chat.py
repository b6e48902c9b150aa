"""`vrwkv chat`: talk about an image with a VisualRWKV model in RNN mode."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False)


@app.command()
def chat(
    model: Annotated[str, typer.Option("--model", "-m", help="Our output dir, a released .pth, or a registry name.")],
    image: Annotated[Optional[list[str]], typer.Option("--image", "-i", help="Image file (repeatable).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Answer this once and exit.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32 or bf16.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: all).")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Show tokens/s and time to first token.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --prompt: one JSON line with answer and timings.")] = False,
    download: Annotated[bool, typer.Option("--download", help="Fetch a registry model if it is not on disk.")] = False,
) -> None:
    """Chat about an image (interactive), or answer one --prompt and exit.

    Example: vrwkv chat --model out/tiny/finetune --image cat.png --prompt "What color is the circle?"
    """
    from vrwkv_core.errors import NotImplementedYet

    raise NotImplementedYet("vrwkv chat is not implemented yet")
