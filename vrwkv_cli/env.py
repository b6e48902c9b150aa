"""`vrwkv env`: what this machine has (versions, CUDA, kernel build) and where files go."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(add_completion=False)


@app.command()
def env(
    build: Annotated[bool, typer.Option("--build/--no-build", help="Try to build the CUDA kernel.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print versions (Python, torch, CUDA, nvcc, ninja, DeepSpeed, Lightning, timm) and paths.

    Example: vrwkv env
    """
    import json

    from vrwkv_core.env import collect_env

    info = collect_env(try_build=build)
    if as_json:
        print(json.dumps(info))
        return
    from rich.table import Table

    from vrwkv_cli.common import console

    table = Table(title="vrwkv environment", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)
