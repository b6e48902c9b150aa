"""`vrwkv export`: convert one of our model dirs to the released .pth layouts."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(add_completion=False)


@app.command()
def export(
    model_dir: Annotated[str, typer.Argument(help="One of our output dirs (config.yaml + model.safetensors).")],
    out: Annotated[str, typer.Option("--out", "-o", help="The .pth file to write.")],
    lm_only: Annotated[bool, typer.Option("--lm-only", help="Write only the RWKV LM, as RWKV-LM's .pth layout.")] = False,
) -> None:
    """Write a model dir as a released VisualRWKV .pth (or, with --lm-only, an RWKV .pth).

    Example: vrwkv export out/tiny/finetune --out tiny.pth
    """
    from vrwkv_core.errors import NotImplementedYet

    raise NotImplementedYet("vrwkv export is not implemented yet")
