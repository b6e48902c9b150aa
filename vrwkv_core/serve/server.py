"""Runs the server: loads the model, starts the engine and uvicorn; Ctrl-C / SIGTERM stop it cleanly.

On the first signal running answers end at once (finish reason `abort`, their streams
close normally), queued requests get 503, uvicorn finishes its connections, the
scheduler thread stops, and `serve` returns (the CLI exits 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import uvicorn

from vrwkv_core.errors import VrwkvError
from vrwkv_core.infer import load_model
from vrwkv_core.serve.app import ServeSettings, create_app
from vrwkv_core.serve.engine import Engine
from vrwkv_core.serve.metrics import Metrics
from vrwkv_core.tokenizer import default_tokenizer

LOOPBACK = "127.0.0.1"


def resolve_host(host: str | None, api_key: str | None, say: Callable[[str], None]) -> str:
    """The address to bind: loopback unless --host is given; says what an unprotected server exposes."""
    if host is None:
        if api_key is None:
            say(f"no API key (--api-key or VRWKV_API_KEY): listening on {LOOPBACK} only; give --host to listen elsewhere")
        return LOOPBACK
    if api_key is None and host not in (LOOPBACK, "localhost", "::1"):
        say(f"warning: no API key, and --host {host}: anyone who reaches this address can use the server")
    return host


def serve(
    model: str,
    host: str | None = None,
    port: int = 8000,
    device: str = "auto",
    dtype: str = "auto",
    max_batch: int = 16,
    max_queue: int = 256,
    state_cache_mb: float = 1024,
    api_key: str | None = None,
    image_root: str | Path | None = None,
    max_image_mb: float = 20,
    max_context: int = 8192,
    prefill_pad: bool = True,
    fast_batch: bool = True,
    load_options: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Serves `model` until Ctrl-C / SIGTERM; `prefill_pad`: pad each conversation's first prefill
    as `chat` does (a new question about a cached image then hits the cache only when its pad matches);
    `fast_batch`: see `Engine`;
    `load_options`: more `load_model` arguments (quant, adapter, state, merge_adapter, wkv_backend)."""
    if max_batch < 1 or max_queue < 0 or max_context < 1 or state_cache_mb < 0 or max_image_mb <= 0:
        raise VrwkvError("--max-batch and --max-context must be >= 1; --max-queue, --state-cache-mb >= 0; --max-image-mb > 0")
    root = None
    if image_root is not None:
        root = Path(image_root).expanduser()
        if not root.is_dir():
            raise VrwkvError(f"--image-root {root}: not a directory")
    bind = resolve_host(host, api_key, say)
    say(f"loading {model} ...")
    vlm = load_model(model, device=device, dtype=dtype, **(load_options or {}))
    metrics = Metrics()
    engine = Engine(vlm, default_tokenizer(), max_batch=max_batch, max_queue=max_queue,
                    state_cache_mb=state_cache_mb, metrics=metrics, fast_batch=fast_batch)  # fmt: skip
    settings = ServeSettings(model_name=model, api_key=api_key, image_root=root,
                             max_image_bytes=int(max_image_mb * 2**20), max_context=max_context,
                             prefill_pad=prefill_pad)  # fmt: skip
    app = create_app(engine, settings, metrics)
    server = _Server(uvicorn.Config(app, host=bind, port=port, log_level="warning", timeout_graceful_shutdown=10),
                     on_exit=engine.abort_all)  # fmt: skip
    say(f"serving {model} on http://{bind}:{port} (OpenAI API at /v1, demo page at /); Ctrl-C stops")
    try:
        server.run()
    finally:
        engine.close()
    if not server.started:
        raise VrwkvError(f"could not listen on {bind}:{port} (in use, or not an address of this machine?)")
    say("stopped")


class _Server(uvicorn.Server):
    """uvicorn.Server whose exit signal first ends the running answers (else streams hold it open)
    and that returns normally after the signal."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the captured signal after its shutdown; a stop on request exits 0
        self._captured_signals.clear()


__all__ = ["resolve_host", "serve"]
