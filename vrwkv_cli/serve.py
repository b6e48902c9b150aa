"""`vrwkv serve`: an OpenAI-compatible chat server for a VisualRWKV model (see vrwkv_core.serve)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from vrwkv_cli.common import AdapterOpt, MergeAdapterOpt, PrefillPadOpt, QuantOpt, StateOpt, WkvBackendOpt

app = typer.Typer(add_completion=False)


@app.command()
def serve(
    model: Annotated[str, typer.Option("--model", "-m", help="Our output dir, a released .pth, or a registry name.")],
    host: Annotated[Optional[str], typer.Option(help="Address to bind [default: 127.0.0.1].")] = None,
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ... or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or auto.")] = "auto",
    max_batch: Annotated[int, typer.Option(help="Most answers decoded together.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting (more: 429).")] = 256,
    state_cache_mb: Annotated[float, typer.Option(help="Memory for cached conversation states (LRU).")] = 1024,
    api_key: Annotated[Optional[str], typer.Option(envvar="VRWKV_API_KEY", help="Required Bearer key (also VRWKV_API_KEY).")] = None,
    image_root: Annotated[Optional[str], typer.Option(help="Allow image file paths / file:// URLs under this folder.")] = None,
    max_image_mb: Annotated[float, typer.Option(help="Largest image accepted (more: 413).")] = 20,
    max_context: Annotated[int, typer.Option(help="Longest prompt in tokens (images included).")] = 8192,
    prefill_pad: PrefillPadOpt = True,
    fast_batch: Annotated[bool, typer.Option(help="CPU fp32: decode through packed matrices (~2x faster for many "
                                             "rows, the same answer alone or batched; one more fp32 copy of them).")] = True,
    quant: QuantOpt = None,
    adapter: AdapterOpt = None,
    state: StateOpt = None,
    merge_adapter: MergeAdapterOpt = False,
    wkv_backend: WkvBackendOpt = None,
) -> None:
    """Serve a model with the OpenAI chat API (/v1/chat/completions), /metrics and a demo page at /.

    Without an API key the server listens on 127.0.0.1 only unless --host is given.
    Ctrl-C or SIGTERM stop it cleanly.

    Example: vrwkv serve --model out/tiny/finetune --port 8000
    """
    from vrwkv_core.serve.server import serve as run_server

    run_server(model, host=host, port=port, device=device, dtype=dtype, max_batch=max_batch, max_queue=max_queue,
               state_cache_mb=state_cache_mb, api_key=api_key, image_root=image_root, max_image_mb=max_image_mb,
               max_context=max_context, prefill_pad=prefill_pad, fast_batch=fast_batch,
               load_options={"quant": quant, "adapter": adapter, "state": state, "merge_adapter": merge_adapter,
                             "wkv_backend": wkv_backend}, say=lambda msg: typer.echo(msg, err=True))  # fmt: skip
