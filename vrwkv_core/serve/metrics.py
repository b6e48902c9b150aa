"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Requests, tokens in and out, active rows, queue depth, TTFT and per-token latency."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vrwkv_requests", "Chat completion requests by outcome.", ["status"], registry=r)
        self.prompt = Counter("vrwkv_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.prompt_cached = Counter("vrwkv_prompt_tokens_cached", "Prompt tokens restored from the state cache.", registry=r)
        self.generated = Counter("vrwkv_generation_tokens", "Generated tokens.", registry=r)
        self.cache_lookups = Counter("vrwkv_state_cache_lookups", "State cache lookups.", ["result"], registry=r)
        self.active = Gauge("vrwkv_active_rows", "Rows in the decoding batch.", registry=r)
        self.queue = Gauge("vrwkv_queue_depth", "Requests waiting to join the batch.", registry=r)
        self.cache_bytes = Gauge("vrwkv_state_cache_bytes", "Bytes held by the state cache.", registry=r)
        self.ttft = Histogram("vrwkv_time_to_first_token_seconds", "Submission to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.per_token = Histogram("vrwkv_time_per_output_token_seconds", "Seconds of one batched decode step.",
                                   buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_rows = Histogram("vrwkv_decode_batch_rows", "Rows advanced by one batched decode step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)  # fmt: skip

    # called by the engine (scheduler thread)
    def set_load(self, active: int, queued: int, cache_bytes: int) -> None:
        self.active.set(active)
        self.queue.set(queued)
        self.cache_bytes.set(cache_bytes)

    def prompt_tokens(self, n: int, cached: int) -> None:
        self.prompt.inc(n)
        self.prompt_cached.inc(cached)

    def cache(self, hit: bool) -> None:
        self.cache_lookups.labels("hit" if hit else "miss").inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def decode_step(self, rows: int, seconds: float) -> None:
        self.per_token.observe(seconds)
        self.batch_rows.observe(rows)

    def finished(self, n_tokens: int) -> None:
        self.generated.inc(n_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
