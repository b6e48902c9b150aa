"""The scheduler: one thread owns the model and runs continuous batching over RNN rows.

Each loop: queued requests join (up to `max_batch` rows): the longest cached prefix of
the conversation is restored from the `StateCache` and only the rest is prefilled
(split after its last image, whose state is cached too); then every active row samples
its next token from its own logits with its own `Sampler` (own config and seed) and all
rows that go on advance in one `DecodeBatch.step`. Finished rows leave at once, and
their state is cached under the conversation so far, so the follow-up turn prefills
only its new tokens. Cancelled rows (the client went away) leave before the next step.

Events go to each request's `emit` callback from this thread: `Delta(text)` pieces,
then one `Finished` or `Failed`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Union

import torch

from vrwkv_core.infer import DecodeBatch, GenerationConfig, Sampler, prefill, take_token
from vrwkv_core.infer.generate import TextAssembler
from vrwkv_core.infer.sampling import IMAGE_TOKEN_ID
from vrwkv_core.serve.engine.cache import AnswerMemo, StateCache, prefix_key

if TYPE_CHECKING:
    from PIL import Image

    from vrwkv_core.model.rwkv.state import RWKVState
    from vrwkv_core.tokenizer import RWKVTokenizer

log = logging.getLogger("vrwkv.serve")
STOP_OF_TURN = 261  # "\n\n" closes an answer in the template


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str
    """stop, length or abort (the server is stopping)."""
    text: str
    n_prompt: int
    n_completion: int
    n_cached: int
    ttft_s: float | None


@dataclass
class Failed:
    status: int
    message: str
    code: str | None = None


Event = Union[Delta, Finished, Failed]


@dataclass
class PromptImage:
    key: str
    """Content hash (`image_key`)."""
    views: list[Image.Image]
    """What the image processor makes of it: one placeholder run per view."""


@dataclass
class EngineRequest:
    """One answer to generate: the conversation's ids and images, the knobs, where events go."""

    ids: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    images: list[PromptImage] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)
    """Prefix lengths worth looking up in the cache (turn ends, after images)."""
    min_tokens: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    """Set from any thread when the client goes away; the row leaves before the next step."""


class QueueFull(Exception):
    """The queue holds --max-queue requests already."""


class ShuttingDown(Exception):
    """The engine takes no new requests."""


@dataclass
class _Row:
    req: EngineRequest
    sampler: Sampler
    text: TextAssembler
    stops: set[int]
    n_cached: int
    tokens: list[int] = field(default_factory=list)
    ttft: float | None = None
    free_config: GenerationConfig | None = None
    """The config once min_tokens are reached (stop tokens allowed again), if it differs."""


class Engine:
    """Owns the model in one scheduler thread; `submit` from any thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: RWKVTokenizer, max_batch: int = 16,
                 max_queue: int = 256, state_cache_mb: float = 1024, metrics: Any = None) -> None:  # fmt: skip
        self.model = model
        self.tok = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.cache = StateCache(int(state_cache_mb * 2**20))
        self.memo = AnswerMemo()
        self.metrics = metrics
        self.cache_hits = 0
        self.cache_misses = 0
        self._queue: deque[EngineRequest] = deque()
        self._rows: dict[int, _Row] = {}
        self._batch = DecodeBatch(model)
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._aborting = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vrwkv-scheduler", daemon=True)
        self._thread.start()

    # any thread -------------------------------------------------------------------------

    def submit(self, req: EngineRequest) -> None:
        """Queues a request; QueueFull or ShuttingDown when it cannot be taken."""
        with self._cv:
            if self._aborting or self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting): try again later")
            self._queue.append(req)
            self._gauges()
            self._cv.notify()

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def abort_all(self) -> None:
        """Ends every running answer (finish reason `abort`), fails the queued ones, refuses new ones."""
        with self._cv:
            self._aborting = True
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Aborts everything and stops the scheduler thread."""
        with self._cv:
            self._aborting = self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # the scheduler thread --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._rows and not self._aborting:
                    self._cv.wait()
                if self._aborting:
                    queued, self._queue = list(self._queue), deque()
                else:
                    n = max(0, self.max_batch - len(self._rows))
                    queued = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
                self._gauges()
            if self._aborting:
                for req in queued:
                    _send(req, Failed(503, "the server is shutting down", "server_shutting_down"))
                for rid in list(self._rows):
                    self._finish(rid, "abort")
                self._batch.remove(list(self._batch.keys))
                self._gauges()
                if self._closed:
                    return
                with self._cv:
                    if not self._queue and not self._closed:
                        self._cv.wait(0.5)
                continue
            for req in queued:
                if not req.cancelled:
                    self._admit(req)
            self._drop_cancelled()
            if self._rows:
                try:
                    self._step()
                except Exception as err:  # a failing forward must not kill the server: end the batch
                    log.exception("decode step failed")
                    for rid in list(self._rows):
                        row = self._rows.pop(rid)
                        _send(row.req, Failed(500, f"generation failed: {type(err).__name__}: {err}"))
                    self._batch = DecodeBatch(self.model)
            self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(len(self._rows), len(self._queue), self.cache.nbytes)

    def _admit(self, req: EngineRequest) -> None:
        """Restores the longest cached prefix, prefills the rest, adds the row to the batch."""
        try:
            start, state = self._lookup(req)
            logits, state = self._prefill_rest(req, start, state)
        except Exception as err:
            log.exception("prefill failed")
            _send(req, Failed(500, f"prefill failed: {type(err).__name__}: {err}"))
            return
        cfg = req.config
        stops = set(cfg.stop_tokens)
        first_cfg, free_cfg = cfg, None
        if req.min_tokens > 0 and stops:  # stop tokens are banned until min_tokens are out
            first_cfg = replace(cfg, banned_tokens=tuple(cfg.banned_tokens) + tuple(sorted(stops)))
            free_cfg = cfg
        row = _Row(req, Sampler(first_cfg, 1, logits.shape[-1], logits.device), TextAssembler(self.tok, cfg.stop_strings),
                   stops, start, free_config=free_cfg)  # fmt: skip
        rid = next(self._ids)
        self._rows[rid] = row
        self._batch.add(rid, logits, state)
        if self.metrics is not None:
            self.metrics.prompt_tokens(len(req.ids), start)

    def _lookup(self, req: EngineRequest) -> tuple[int, RWKVState | None]:
        """(length, state) of the longest cached prefix that leaves at least one token to run."""
        n = len(req.ids)
        candidates = sorted({b - d for b in req.boundaries for d in (0, 1, 2) if 0 < b - d < n}, reverse=True)
        for b in candidates:
            state = self.cache.get(self._key(req, b))
            if state is not None:
                self.cache_hits += 1
                if self.metrics is not None:
                    self.metrics.cache(True)
                return b, state
        self.cache_misses += 1
        if self.metrics is not None:
            self.metrics.cache(False)
        return 0, None

    def _key(self, req: EngineRequest, length: int, extra: list[int] | None = None) -> str:
        ids = req.ids[:length] + (extra or [])
        n_views = sum(1 for i in range(0, length) if ids[i] == IMAGE_TOKEN_ID and (i == 0 or ids[i - 1] != IMAGE_TOKEN_ID))
        keys, seen = [], 0
        for im in req.images:  # the images whose placeholder runs lie in the prefix
            if seen >= n_views:
                break
            keys.append(im.key)
            seen += len(im.views)
        return prefix_key(ids, keys)

    def _prefill_rest(self, req: EngineRequest, start: int, state: RWKVState | None) -> tuple[torch.Tensor, RWKVState]:
        rest = req.ids[start:]
        image_pos = [i for i, t in enumerate(rest) if t == IMAGE_TOKEN_ID]
        if not image_pos:
            return prefill(self.model, rest, None, state)
        # the views in `rest` are the last ones of the conversation (cache boundaries never cut a run)
        views = [v for im in req.images for v in im.views]
        n_rest = sum(1 for j, i in enumerate(image_pos) if j == 0 or image_pos[j - 1] != i - 1)
        proc = self.model.image_processor  # type: ignore[attr-defined]
        split = image_pos[-1] + 1
        _, state = prefill(self.model, rest[:split], proc.batch(views[len(views) - n_rest :]), state)
        self.cache.put(self._key(req, start + split), state)  # a new question about these images skips them
        return prefill(self.model, rest[split:], None, state)

    def _drop_cancelled(self) -> None:
        gone = [rid for rid, row in self._rows.items() if row.req.cancelled]
        for rid in gone:
            del self._rows[rid]
        self._batch.remove(gone)

    def _step(self) -> None:
        """Samples one token per row, ends finished rows, advances the others together."""
        assert self._batch.logits is not None
        now = time.perf_counter()
        feed: dict[int, int] = {}
        done: list[int] = []
        logits = self._batch.logits
        for i, rid in enumerate(list(self._batch.keys)):
            row = self._rows[rid]
            token = int(row.sampler(logits[i : i + 1])[0])
            if row.ttft is None:
                row.ttft = now - row.req.t_submit
                if self.metrics is not None:
                    self.metrics.first_token(row.ttft)
            piece, reason = take_token(token, row.tokens, row.text, row.stops, row.req.config.max_new_tokens)
            if row.free_config is not None and len(row.tokens) >= row.req.min_tokens:
                row.sampler.config, row.free_config = row.free_config, None
            if piece:
                _send(row.req, Delta(piece))
            if reason is None:
                feed[rid] = token
            else:
                self._finish(rid, reason)
                done.append(rid)
        self._batch.remove(done)
        t0 = time.perf_counter()
        if feed:
            self._batch.step([feed[rid] for rid in self._batch.keys])
            if self.metrics is not None:
                self.metrics.decode_step(len(feed), time.perf_counter() - t0)

    def _finish(self, rid: int, reason: str) -> None:
        """Ends a row: the held-back text, the result event, its state into the cache (the caller
        removes it from the batch)."""
        row = self._rows.pop(rid)
        req = row.req
        if reason not in ("stop_string", "abort"):
            tail = row.text.finish()
            if tail:
                _send(req, Delta(tail))
        text = row.text.emitted
        if reason in ("stop_token", "length") and row.tokens:
            # the state has seen the prompt and every token but one that was not fed yet
            n_fed = len(row.tokens) - (1 if reason == "length" else 0)
            self.cache.put(self._key(req, len(req.ids), row.tokens[:n_fed]), self._batch.row_state(rid))
            self.memo.put(answer_text(text), row.tokens + [STOP_OF_TURN])
        finish = {"stop_token": "stop", "stop_string": "stop"}.get(reason, reason)
        if self.metrics is not None:
            self.metrics.finished(len(row.tokens))
        _send(req, Finished(finish, text, len(req.ids), len(row.tokens), row.n_cached, row.ttft))


def answer_text(text: str) -> str:
    """An answer as the API returns it: without the space that follows `Assistant:`."""
    return text.lstrip()


def _send(req: EngineRequest, event: Event) -> None:
    try:
        req.emit(event)
    except Exception:  # a client whose loop is gone must not stop the scheduler
        req.cancelled = True


__all__ = ["Delta", "Engine", "EngineRequest", "Event", "Failed", "Finished", "PromptImage", "QueueFull",
           "ShuttingDown", "answer_text"]  # fmt: skip
