"""`vrwkv bench serve`: the serving engine's batching and state cache, measured side by side.

A random-weight RWKV-7 (0.1B shape by default: L12 D768, vocab 65536; made as `bench lm`
makes its checkpoint) runs in the `Engine` that `vrwkv serve` uses, with clients as
threads submitting requests directly (no HTTP):

- decode: k clients each send a 16-token prompt and ask for `decode_tokens` tokens
  (ignore_eos, greedy) at once, for each k in `clients`. "decode tokens/s" (the issue's
  aggregate decode throughput) = the tokens after each client's first one / the time from
  the first client's first token to the last answer's end; "with prefill" = all tokens /
  the time from submission to the last answer. Ratios are over one client;
- follow-up TTFT: a `conversation`-token first turn is answered, then the follow-up turn
  (which repeats it) is timed to its first token with the state cache (only the new
  tokens run) and after clearing the cache (the whole conversation is prefilled).

`clock="cpu"` times the process's CPU time instead of wall time (all threads: the
scheduler's and the clients'): with threads=1 it is robust on a busy shared machine.
`fast_batch` decodes through `use_batched_route` (oneDNN-packed matrices for several rows).

    python -c "from vrwkv_core.bench.serve import run_serve_bench; print(run_serve_bench(n_layer=2, n_embd=64))"
"""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from pathlib import Path

import torch

from vrwkv_core.bench.lm import _CLOCKS, random_rwkv7_weights
from vrwkv_core.config import RWKVSection
from vrwkv_core.errors import VrwkvError
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


def _ask(engine, ids: list[int], max_tokens: int, boundaries: list[int] | None = None,
         timer=time.perf_counter) -> tuple[float, float, object]:  # fmt: skip
    """Submits one request and waits: (time of the first token, time of the end, Finished) on `timer`."""
    events: queue.Queue = queue.Queue()
    cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=0.0, stop_tokens=())
    engine.submit(EngineRequest(list(ids), cfg, events.put, boundaries=boundaries or []))
    first = None
    while True:
        ev = events.get()
        if first is None and isinstance(ev, (Delta, Finished)):
            first = timer()
        if isinstance(ev, Finished):
            return first, timer(), ev
        if not isinstance(ev, Delta):
            raise RuntimeError(f"request failed: {ev}")


def _clients(engine, prompts: list[list[int]], max_tokens: int, timer) -> tuple[float, float]:
    """k clients at once: (seconds from the first client's first token to the last end, seconds
    from submission to the last end)."""
    times: list = [None] * len(prompts)

    def client(i: int) -> None:
        times[i] = _ask(engine, prompts[i], max_tokens, timer=timer)

    t0 = timer()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    end = max(t[1] for t in times)
    return end - min(t[0] for t in times), end - t0


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
    clock: str = "wall",
    fast_batch: bool = True,
) -> list[dict]:
    """Rows {"measure", "setting", "value", "unit", "ratio"}, the decode rows also "with_prefill"
    and "with_prefill_ratio" (see the module docstring)."""
    if clock not in _CLOCKS:
        raise VrwkvError(f"clock must be one of {', '.join(_CLOCKS)}, got {clock!r}")
    if decode_tokens < 2:
        raise VrwkvError(f"decode_tokens must be >= 2 (the first token ends the prefill), got {decode_tokens}")
    timer = _CLOCKS[clock]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = RWKVSection(n_layer=n_layer, n_embd=n_embd, head_size=64 if n_embd >= 64 else n_embd, vocab_size=vocab_size)
        model = _model(cfg, device)
        engine = Engine(model, default_tokenizer(), max_batch=max(clients), max_queue=max(clients), state_cache_mb=1024,
                        fast_batch=fast_batch)
        g = torch.Generator().manual_seed(0)

        def prompt(n: int) -> list[int]:
            return torch.randint(1, min(vocab_size, 65000), (n,), generator=g).tolist()

        rows: list[dict] = []
        _ask(engine, prompt(8), 4)  # warm-up
        base = None
        for k in clients:
            decode, total = float("inf"), float("inf")
            for _ in range(repeats):
                d, t = _clients(engine, [prompt(16) for _ in range(k)], decode_tokens, timer)
                decode, total = min(decode, d), min(total, t)
            tps, e2e = k * (decode_tokens - 1) / decode, k * decode_tokens / total
            base = base or (tps, e2e)
            rows.append({"measure": "decode tokens/s", "setting": f"{k} client{'s' if k > 1 else ''}",
                         "value": round(tps, 1), "unit": "tok/s", "ratio": round(tps / base[0], 2),
                         "with_prefill": round(e2e, 1), "with_prefill_ratio": round(e2e / base[1], 2)})  # fmt: skip

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
            t0 = timer()
            t_cached, _, ev = _ask(engine, follow, 1, boundaries=[b], timer=timer)
            t_cached -= t0
            assert ev.n_cached > 0, "the follow-up did not hit the state cache"
            cached = min(cached, t_cached)
            engine.cache.clear()
            t0 = timer()
            t_full, _, ev = _ask(engine, follow, 1, boundaries=[b], timer=timer)
            t_full -= t0
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
