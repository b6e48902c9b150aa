"""`vrwkv bench serve`: the serving engine's batching and state cache, measured side by side.

A random-weight RWKV-7 (0.1B shape by default: L12 D768, vocab 65536; made as `bench lm`
makes its checkpoint) runs in the `Engine` that `vrwkv serve` uses, with clients as
threads submitting requests directly (no HTTP):

- decode: k clients each ask for `decode_tokens` tokens (ignore_eos, greedy) at once;
  aggregate tokens/s = all tokens / wall time from submission to the last answer, for
  each k in `clients`; ratio over one client;
- follow-up TTFT: a `conversation`-token first turn is answered, then the follow-up turn
  (which repeats it) is timed to its first token with the state cache (only the new
  tokens run) and after clearing the cache (the whole conversation is prefilled).

    python -c "from vrwkv_core.bench.serve import run_serve_bench; print(run_serve_bench(n_layer=2, n_embd=64))"
"""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from pathlib import Path

import torch

from vrwkv_core.bench.lm import random_rwkv7_weights
from vrwkv_core.config import RWKVSection
from vrwkv_core.infer import GenerationConfig
from vrwkv_core.model.rwkv.rwkv7 import RWKV7
from vrwkv_core.serve.engine import Delta, Engine, EngineRequest, Finished, answer_text
from vrwkv_core.tokenizer import default_tokenizer


def _model(cfg: RWKVSection, device: str = "cpu") -> torch.nn.Module:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-rwkv7.pth"
        torch.save(random_rwkv7_weights(cfg), path)
        model = RWKV7.from_checkpoint(path).eval()
    if device == "cpu":
        return model.optimize_for_inference()  # the CPU decoding layout `load_model` uses too
    return model.to(device)


def _ask(engine, ids: list[int], max_tokens: int, boundaries: list[int] | None = None) -> tuple[float, float, object]:
    """Submits one request and waits: (seconds to first token, seconds to the end, Finished)."""
    events: queue.Queue = queue.Queue()
    cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=0.0, stop_tokens=())
    t0 = time.perf_counter()
    engine.submit(EngineRequest(list(ids), cfg, events.put, boundaries=boundaries or []))
    first = None
    while True:
        ev = events.get()
        if first is None and isinstance(ev, (Delta, Finished)):
            first = time.perf_counter() - t0
        if isinstance(ev, Finished):
            return first, time.perf_counter() - t0, ev
        if not isinstance(ev, Delta):
            raise RuntimeError(f"request failed: {ev}")


@torch.no_grad()
def run_serve_bench(
    threads: int = 2,
    n_layer: int = 12,
    n_embd: int = 768,
    vocab_size: int = 65536,
    clients: tuple[int, ...] = (1, 4, 16),
    decode_tokens: int = 32,
    conversation: int = 2000,
    repeats: int = 2,
    device: str = "cpu",
) -> list[dict]:
    """Rows {"measure", "setting", "value", "unit", "ratio"} (see the module docstring)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = RWKVSection(n_layer=n_layer, n_embd=n_embd, head_size=64 if n_embd >= 64 else n_embd, vocab_size=vocab_size)
        model = _model(cfg, device)
        engine = Engine(model, default_tokenizer(), max_batch=max(clients), max_queue=max(clients), state_cache_mb=1024)
        g = torch.Generator().manual_seed(0)

        def prompt(n: int) -> list[int]:
            return torch.randint(1, min(vocab_size, 65000), (n,), generator=g).tolist()

        rows: list[dict] = []
        _ask(engine, prompt(8), 4)  # warm-up
        base = None
        for k in clients:
            best = float("inf")
            for _ in range(repeats):
                prompts = [prompt(16) for _ in range(k)]
                t0 = time.perf_counter()
                workers = [threading.Thread(target=_ask, args=(engine, p, decode_tokens)) for p in prompts]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                best = min(best, time.perf_counter() - t0)
            tps = k * decode_tokens / best
            base = base or tps
            rows.append({"measure": "decode tokens/s", "setting": f"{k} client{'s' if k > 1 else ''}",
                         "value": round(tps, 1), "unit": "tok/s", "ratio": round(tps / base, 2)})  # fmt: skip

        first_turn = prompt(conversation)
        follow, b = first_turn, 0
        cached, full = float("inf"), float("inf")
        for _ in range(repeats):
            engine.cache.clear()
            _, _, done = _ask(engine, first_turn, 4, boundaries=[])
            # the follow-up repeats the first turn and its answer's ids (as the memo encodes them)
            answer = engine.memo.get(answer_text(done.text))
            follow = first_turn + (answer or []) + prompt(16)
            b = len(first_turn) + len(answer or [])
            t_cached, _, ev = _ask(engine, follow, 1, boundaries=[b])
            assert ev.n_cached > 0, "the follow-up did not hit the state cache"
            cached = min(cached, t_cached)
            engine.cache.clear()
            t_full, _, ev = _ask(engine, follow, 1, boundaries=[b])
            assert ev.n_cached == 0
            full = min(full, t_full)
        rows.append({"measure": "follow-up TTFT", "setting": f"re-prefill {len(follow)} tokens",
                     "value": round(full * 1000, 1), "unit": "ms", "ratio": 1.0})  # fmt: skip
        rows.append({"measure": "follow-up TTFT", "setting": f"state cache ({len(follow) - b} new tokens)",
                     "value": round(cached * 1000, 1), "unit": "ms", "ratio": round(full / cached, 1)})  # fmt: skip
        engine.close()
        return rows
    finally:
        torch.set_num_threads(old_threads)


__all__ = ["run_serve_bench"]
