"""Shared by the serve tests: an in-process server on a free loopback port, image data URLs."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

API_KEY = "test-key"
COLORS = [(220, 30, 30), (30, 200, 40), (30, 40, 210), (230, 220, 20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class LiveServer:
    """uvicorn in a thread serving `create_app` for a loaded model."""

    def __init__(self, model_dir: Path, image_root: Path, api_key: str | None = API_KEY, prefill_pad: bool = False,
                 **engine_kw) -> None:  # fmt: skip
        """`prefill_pad` off by default: the cache tests then hit for any question (the pad is tested apart)."""
        import uvicorn

        from vrwkv_core.infer import load_model
        from vrwkv_core.serve.app import ServeSettings, create_app
        from vrwkv_core.serve.engine import Engine
        from vrwkv_core.serve.metrics import Metrics
        from vrwkv_core.tokenizer import default_tokenizer

        self.vlm = load_model(model_dir, device="cpu")
        self.tok = default_tokenizer()
        self.model_name = str(model_dir)
        self.engine = Engine(self.vlm, self.tok, metrics=Metrics(), **engine_kw)
        settings = ServeSettings(model_name=self.model_name, api_key=api_key, image_root=image_root,
                                 max_image_bytes=64 * 1024, max_context=600, prefill_pad=prefill_pad)  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.engine, settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        """A sample's value from /metrics."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        self.engine.abort_all()
        self.server.should_exit = True
        self.thread.join(15)
        self.engine.close()


@pytest.fixture(scope="session")
def live(tiny_trained, tmp_path_factory):
    """The server on 127.0.0.1 (free port) with the shared tiny model, an API key, and an image
    root holding red.png (import this fixture into a test module to use it)."""
    root = tmp_path_factory.mktemp("image_root")
    Image.new("RGB", (40, 30), COLORS[0]).save(root / "red.png")
    srv = LiveServer(tiny_trained["finetune"], root)
    srv.root = root
    yield srv
    srv.stop()
