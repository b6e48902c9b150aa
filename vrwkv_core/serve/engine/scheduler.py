"""The scheduler: one thread owns the model and runs continuous batching over RNN rows.

Each loop: the queued requests join together (up to `max_batch` rows): the longest cached
prefix of each conversation is restored from the `StateCache`; the part up to its last
image runs alone (towers, placeholders; that state is cached too); the text tails are
prefilled in chunks of `PREFILL_CHUNK` tokens counted from each tail's start (so a tail is
cut the same way alone or in a crowd), the chunks of equal length as one batch, up to
`prefill_budget` tokens a turn: a burst of long prompts is spread over several turns with a
decode step for the running rows between them. A request whose tail is done becomes a
row. Then every active row picks its next token (greedy
penalty-free rows in one argmax over the batch, the others with their own
`Sampler`: own config and seed) and all rows that go on advance in one `DecodeBatch.step`.
Finished rows leave at once, and their state is cached under the conversation so far, so
the follow-up turn prefills only its new tokens. Cancelled rows (the client went away)
leave before the next step.

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
from vrwkv_core.infer.batch import greedy_tokens
from vrwkv_core.infer.generate import TextAssembler, language_model
from vrwkv_core.infer.sampling import IMAGE_TOKEN_ID
from vrwkv_core.model.rwkv.state import RWKVState
from vrwkv_core.serve.engine.cache import AnswerMemo, StateCache, prefix_key

if TYPE_CHECKING:
    from PIL import Image

    from vrwkv_core.tokenizer import RWKVTokenizer

log = logging.getLogger("vrwkv.serve")
STOP_OF_TURN = 261  # "\n\n" closes an answer in the template
PREFILL_CHUNK = 512
"""Longest piece of a text tail prefilled in one forward."""
PREFILL_BUDGET = 1024
"""Prompt tokens prefilled per loop turn (at least one chunk): bounds how long new requests hold
up the running rows' decode steps (images run whole when their request is taken)."""


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

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: `greedy_tokens` over the batch picks its token."""
        cfg = self.sampler.config
        return cfg.greedy and not cfg.presence_penalty and not cfg.frequency_penalty


@dataclass
class _Pending:
    """A request whose text tail is being prefilled."""

    req: EngineRequest
    n_cached: int
    pos: int
    """Prompt tokens in `state` (the cached prefix, the images, the chunks run so far)."""
    state: RWKVState | None
    tail: int
    """Where the text tail starts (chunks are counted from here)."""

    @property
    def chunk(self) -> int:
        """Tokens of the next chunk."""
        return min(len(self.req.ids) - self.pos, PREFILL_CHUNK - (self.pos - self.tail) % PREFILL_CHUNK)


class Engine:
    """Owns the model in one scheduler thread; `submit` from any thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: RWKVTokenizer, max_batch: int = 16,
                 max_queue: int = 256, state_cache_mb: float = 1024, metrics: Any = None,
                 prefill_budget: int = PREFILL_BUDGET, fast_batch: bool = True) -> None:  # fmt: skip
        """`fast_batch`: CPU fp32 steps through oneDNN-packed matrices (`use_batched_route`): ~2x
        faster for many rows, and a request's answer is then the same bits alone or in any batch
        (MKL's default route rounds small and large batches differently); one more fp32 copy of
        the matrices in memory. A no-op on other devices and dtypes."""
        if fast_batch:
            language_model(model).use_batched_route()
        self.model = model
        self.tok = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget
        self.cache = StateCache(int(state_cache_mb * 2**20))
        self.memo = AnswerMemo()
        self.metrics = metrics
        self.cache_hits = 0
        self.cache_misses = 0
        self._queue: deque[EngineRequest] = deque()
        self._rows: dict[int, _Row] = {}
        self._prefilling: list[_Pending] = []
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
        """Requests waiting for their first token: queued or being prefilled."""
        return len(self._queue) + len(self._prefilling)

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
                while not self._queue and not self._rows and not self._prefilling and not self._aborting:
                    self._cv.wait()
                if self._aborting:
                    queued, self._queue = list(self._queue), deque()
                else:
                    queued = self._take_queued()
                self._gauges()
            if self._aborting:
                queued += [p.req for p in self._prefilling]
                self._prefilling = []
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
            self._admit([req for req in queued if not req.cancelled])
            self._prefill_turn()
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
            self.metrics.set_load(len(self._rows), self.queue_depth, self.cache.nbytes)

    def _take_queued(self) -> list[EngineRequest]:
        """The queued requests that join now: as many as there are free rows. Called with the lock held."""
        free = self.max_batch - len(self._rows) - len(self._prefilling)
        return [self._queue.popleft() for _ in range(min(max(free, 0), len(self._queue)))]

    def _admit(self, reqs: list[EngineRequest]) -> None:
        """Restores each request's longest cached prefix and runs its images; its text tail waits
        for `_prefill_turn`."""
        for req in reqs:
            try:
                start, state = self._lookup(req)
                pos, state = self._prefill_images(req, start, state)
            except Exception as err:
                log.exception("prefill failed")
                _send(req, Failed(500, f"prefill failed: {type(err).__name__}: {err}"))
                continue
            self._prefilling.append(_Pending(req, start, pos, state, pos))

    def _prefill_turn(self) -> None:
        """Runs up to `prefill_budget` tokens of the text tails, the chunks of equal length (and
        alike in having a state) as one batch; the requests whose tail is done join the batch."""
        groups: dict[tuple[int, bool], list[_Pending]] = {}
        for p in self._prefilling:
            # a learned initial state (state tuning) stands in for None, so None rows batch apart
            groups.setdefault((p.chunk, p.state is None), []).append(p)
        budget = self.prefill_budget
        for (n, _), group in groups.items():
            if budget < n and budget < self.prefill_budget:
                break
            group = group[: max(1, budget // n)]
            budget -= n * len(group)
            try:
                ids = torch.tensor([p.req.ids[p.pos : p.pos + n] for p in group])
                states = [p.state for p in group if p.state is not None]
                logits, state = prefill(self.model, ids, None, RWKVState.cat(states) if states else None)
            except Exception as err:
                log.exception("prefill failed")
                for p in group:
                    self._prefilling.remove(p)
                    _send(p.req, Failed(500, f"prefill failed: {type(err).__name__}: {err}"))
                continue
            done = [i for i, p in enumerate(group) if p.pos + n == len(p.req.ids)]
            for i, p in enumerate(group):
                p.pos += n
                if i not in done:
                    p.state = state[i]
            for p in (group[i] for i in done):
                self._prefilling.remove(p)
            if done:
                rows = slice(None) if len(done) == len(group) else done
                rids = [self._add_row(group[i].req, group[i].n_cached, logits.shape[-1], logits.device) for i in done]
                self._batch.add(rids, logits[rows], state.select(rows))

    def _add_row(self, req: EngineRequest, n_cached: int, vocab: int, device: torch.device) -> int:
        """A new row's bookkeeping (sampler, text, stops); returns its id."""
        cfg = req.config
        stops = set(cfg.stop_tokens)
        first_cfg, free_cfg = cfg, None
        if req.min_tokens > 0 and stops:  # stop tokens are banned until min_tokens are out
            first_cfg = replace(cfg, banned_tokens=tuple(cfg.banned_tokens) + tuple(sorted(stops)))
            free_cfg = cfg
        row = _Row(req, Sampler(first_cfg, 1, vocab, device), TextAssembler(self.tok, cfg.stop_strings), stops,
                   n_cached, free_config=free_cfg)  # fmt: skip
        rid = next(self._ids)
        self._rows[rid] = row
        if self.metrics is not None:
            self.metrics.prompt_tokens(len(req.ids), n_cached)
        return rid

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

    def _prefill_images(self, req: EngineRequest, start: int, state: RWKVState | None) -> tuple[int, RWKVState | None]:
        """Runs the prompt from `start` through its last image, if any image is left (the state
        there is cached: a new question about these images skips them): (tokens run, state)."""
        rest = req.ids[start:]
        image_pos = [i for i, t in enumerate(rest) if t == IMAGE_TOKEN_ID]
        if not image_pos:
            return start, state
        # the views in `rest` are the last ones of the conversation (cache boundaries never cut a run)
        views = [v for im in req.images for v in im.views]
        n_rest = sum(1 for j, i in enumerate(image_pos) if j == 0 or image_pos[j - 1] != i - 1)
        proc = self.model.image_processor  # type: ignore[attr-defined]
        split = image_pos[-1] + 1
        _, state = prefill(self.model, rest[:split], proc.batch(views[len(views) - n_rest :]), state)
        self.cache.put(self._key(req, start + split), state)
        return start + split, state

    def _drop_cancelled(self) -> None:
        self._prefilling = [p for p in self._prefilling if not p.req.cancelled]
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
        keys = list(self._batch.keys)
        for rid, token in zip(keys, self._pick(keys, self._batch.logits)):
            row = self._rows[rid]
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

    def _pick(self, keys: list[int], logits: torch.Tensor) -> list[int]:
        """The next token of every row: one argmax over the batch for the greedy penalty-free rows (what
        their `Sampler` would pick), each other row's own `Sampler` for the rest."""
        rows = [self._rows[rid] for rid in keys]
        plain = [i for i, row in enumerate(rows) if row.plain_greedy]
        tokens = [0] * len(rows)
        if plain:
            sub = logits if len(plain) == len(rows) else logits[plain]
            picked = greedy_tokens(sub, [rows[i].sampler.config.banned_tokens for i in plain])
            for i, token in zip(plain, picked):
                tokens[i] = token
        for i, row in enumerate(rows):
            if not row.plain_greedy:
                tokens[i] = int(row.sampler(logits[i : i + 1])[0])
        return tokens

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
