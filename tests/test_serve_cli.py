"""`vrwkv serve` as a process: loopback without a key, 429 when the queue is full, a clean SIGTERM
stop that ends a running answer; `vrwkv bench serve` on a tiny shape."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from serve_helpers import free_port  # noqa: E402


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


@pytest.mark.slow
def test_serve_process_queue_full_and_sigterm(tiny_trained):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "VRWKV_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from vrwkv_cli.main import main; main()", "serve", "--model", str(tiny_trained["finetune"]),
         "--port", str(port), "--device", "cpu", "--max-batch", "1", "--max-queue", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        _wait_ready(url, proc)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]  # no key: open, on loopback
        long = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True,
                "max_tokens": 1_000_000, "ignore_eos": True}  # fmt: skip
        got: dict[str, list[str]] = {"a": [], "b": []}

        def stream(name: str) -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", json=long, timeout=60) as r:
                got[name].append(str(r.status_code))
                got[name].extend(line for line in r.iter_lines() if line)

        a = threading.Thread(target=stream, args=("a",))
        a.start()
        while httpx.get(url + "/health").json()["active_rows"] != 1:
            time.sleep(0.05)
        b = threading.Thread(target=stream, args=("b",))  # waits in the queue (max-batch 1)
        b.start()
        while httpx.get(url + "/health").json()["queue_depth"] != 1:
            time.sleep(0.05)
        r = httpx.post(url + "/v1/chat/completions", json={**long, "stream": False})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        a.join(10)
        b.join(10)
        # the running answer ended with finish reason "abort" and [DONE]; the queued one with an error event
        data = [json.loads(line[6:]) for line in got["a"][1:] if line.startswith("data: {")]
        assert got["a"][0] == "200" and got["a"][-1] == "data: [DONE]"
        assert data[-1]["choices"][0]["finish_reason"] == "abort"
        queued = [json.loads(line[6:]) for line in got["b"][1:] if line.startswith("data: {")]
        assert queued[-1]["error"]["code"] == "server_shutting_down" and got["b"][-1] == "data: [DONE]"
        err = proc.stderr.read()
        assert "127.0.0.1 only" in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_serve_tiny():
    from vrwkv_core.bench.serve import run_serve_bench

    rows = run_serve_bench(threads=1, n_layer=2, n_embd=64, vocab_size=1000, clients=(1, 2), decode_tokens=4,
                           conversation=64, repeats=1)  # fmt: skip
    assert [(r["measure"], r["setting"]) for r in rows] == [
        ("decode tokens/s", "1 client"), ("decode tokens/s", "2 clients"),
        ("follow-up TTFT", "re-prefill 85 tokens"), ("follow-up TTFT", "state cache (16 new tokens)")]  # fmt: skip
    assert rows[0]["ratio"] == 1.0 and all(r["value"] > 0 for r in rows)
    assert rows[0]["with_prefill_ratio"] == 1.0 and rows[1]["with_prefill"] > 0
    # with prefill counts the first token and its wait too: at one client, fewer tokens/s than decode alone
    assert rows[0]["with_prefill"] < rows[0]["value"] * 4 / 3


def test_bench_serve_cpu_clock_and_bad_sizes():
    from vrwkv_core.bench.serve import run_serve_bench
    from vrwkv_core.errors import VrwkvError

    rows = run_serve_bench(threads=1, n_layer=1, n_embd=64, vocab_size=1000, clients=(1, 2), decode_tokens=3,
                           conversation=32, repeats=1, clock="cpu")  # fmt: skip
    assert len(rows) == 4 and all(r["value"] > 0 for r in rows)
    with pytest.raises(VrwkvError, match="decode_tokens must be >= 2"):
        run_serve_bench(decode_tokens=1)
    with pytest.raises(VrwkvError, match="clock must be one of"):
        run_serve_bench(clock="sundial")
