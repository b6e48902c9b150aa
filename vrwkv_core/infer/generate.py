"""RNN-mode generation: prefill the prompt once, then one O(1) step per new token.

Notable:
- `prefill` runs the whole prompt (image features spliced in) through the chunked /
  CUDA kernel and keeps only the last position's logits; decoding then feeds one token
  at a time from the carried state, so the prompt is never run again.
- `Generation` is the streaming iterator of one answer: text pieces that never split a
  UTF-8 character and never show the start of a stop string before it is ruled out.
  After it ends (or is closed, or interrupted by Ctrl-C) `.result` holds the tokens, the
  finish reason, the timings, and the last consistent state: the state has seen the
  prompt and `token_ids[:n_fed]` (the last sampled token is not fed when nothing follows,
  which saves one forward; `unfed_ids` lists what a continuation must feed first).
- `generate_many` / `generate_batch` answer many prompts with continuous batching: up
  to `batch_size` samples decode together (per-sample states concatenated on the batch
  dimension), finished samples drop out (their state rows are selected away) and queued
  prompts take their place. Prompts are prefilled one by one, so prompts of any length
  mix freely; greedy batched outputs equal one-by-one outputs.

    ids = encode_generation_prompt("What is this?", tok, vlm.tokens_per_image)
    images = vlm.image_processor.batch([img])
    for piece in generate_stream(vlm, tok, ids, images, GenerationConfig(max_new_tokens=64)):
        print(piece, end="")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from vrwkv_core.infer.sampling import GenerationConfig, Sampler, make_config
from vrwkv_core.model.rwkv.state import RWKVState
from vrwkv_core.progress import Progress

if TYPE_CHECKING:
    from vrwkv_core.tokenizer import RWKVTokenizer

FINISH_REASONS = ("stop_token", "stop_string", "length", "interrupted")


@dataclass
class GenerationResult:
    """One finished answer."""

    text: str
    """The answer (stop token and stop string removed)."""
    token_ids: list[int]
    """Generated ids, without the stop token (with a stop string's tokens, if one ended it)."""
    finish_reason: str
    """stop_token, stop_string, length or interrupted."""
    stop_token: int | None = None
    """The stop token that ended the answer."""
    n_prompt_tokens: int = 0
    ttft_s: float | None = None
    """Seconds from the start (before prefill) to the first sampled token."""
    total_s: float = 0.0
    """Seconds from the start to the end of the answer."""
    state: RWKVState | None = field(default=None, repr=False)
    """State after the prompt and token_ids[:n_fed] (None from batched generation)."""
    n_fed: int = 0

    @property
    def unfed_ids(self) -> list[int]:
        """Generated ids the state has not seen yet (a continuation feeds these first)."""
        return self.token_ids[self.n_fed :]

    @property
    def n_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first."""
        if self.ttft_s is None or len(self.token_ids) < 2 or self.total_s <= self.ttft_s:
            return None
        return (len(self.token_ids) - 1) / (self.total_s - self.ttft_s)

    def timings(self) -> dict[str, Any]:
        """Numbers for --json / --stats."""
        tps = self.tokens_per_s
        return {
            "n_prompt_tokens": self.n_prompt_tokens,
            "n_new_tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "ttft_s": round(self.ttft_s, 4) if self.ttft_s is not None else None,
            "total_s": round(self.total_s, 4),
            "tokens_per_s": round(tps, 2) if tps is not None else None,
        }


class TextAssembler:
    """Incremental text of generated ids: whole UTF-8 characters only, stop strings cut.

    `push(ids)` returns (text safe to show now, whether a stop string appeared). Text that
    could be the beginning of a stop string is held back until it is ruled out.
    """

    def __init__(self, tokenizer: RWKVTokenizer, stop_strings: Sequence[str] = ()) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._stops = tuple(stop_strings)
        self._held = ""
        self.emitted = ""
        self.stopped = False

    def push(self, ids: list[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        return self._release(self._held + self._decoder.feed(ids))

    def finish(self) -> str:
        """The held-back rest at the end of generation (an incomplete character -> U+FFFD)."""
        if self.stopped:
            return ""
        piece, _ = self._release(self._held + self._decoder.flush(), final=True)
        return piece

    @property
    def pending(self) -> str:
        return self._held

    def _release(self, text: str, final: bool = False) -> tuple[str, bool]:
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            piece, self._held = text[:cut], ""
        else:
            keep = 0 if final else self._partial_stop_len(text)
            piece, self._held = text[: len(text) - keep], text[len(text) - keep :]
        self.emitted += piece
        return piece, self.stopped

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The RWKV7 inside a VisualRWKV, or the model itself."""
    return getattr(model, "rwkv", model)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prefill(
    model: torch.nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    images: dict[str, torch.Tensor] | None = None,
    state: RWKVState | None = None,
) -> tuple[torch.Tensor, RWKVState]:
    """Runs a prompt once (from `state`): (logits of its last position [B, V] float32, state).

    `model` is a VisualRWKV (ids may hold image placeholders; `images` {tower: [N,3,S,S]})
    or a bare RWKV7. 1-D ids are one sample.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.shape[1] == 0:
        raise ValueError("prefill needs at least one token")
    ids = ids.to(_device(model))
    if hasattr(model, "prefill"):
        logits, state = model.prefill(ids, images, state=state)
    else:
        if images:
            raise ValueError("a bare language model takes no images")
        out, state = model(ids, state=state, logits="last")
        logits = out[:, -1]
    return logits.float(), state


@torch.no_grad()
def decode_step(lm: torch.nn.Module, tokens: torch.Tensor, state: RWKVState) -> tuple[torch.Tensor, RWKVState]:
    """Feeds one token per row ([B] ids) from `state`: (next logits [B, V] float32, state).
    Through the LM's CUDA graphs when `infer.cuda_graph.enable_cuda_graphs` gave it some."""
    graphs = lm.__dict__.get("cuda_graphs")
    if graphs is not None:
        return graphs.step(tokens, state)
    if tokens.numel() == 1 and getattr(lm, "batched_route", False):
        # A lone row goes through the packed batch kernel as two copies of itself, so it gets
        # the same bits as in any batch (see `use_batched_route`).
        out, state = lm(tokens.view(1, 1).expand(2, 1).to(_device(lm)), state=RWKVState.cat([state, state]), logits="last")
        return out[:1, -1].float(), state.select(slice(0, 1))
    out, state = lm(tokens.view(-1, 1).to(_device(lm)), state=state, logits="last")
    return out[:, -1].float(), state


def take_token(token: int, tokens: list[int], text: TextAssembler, stops: set[int],
               max_new: int) -> tuple[str, str | None]:
    """One sampled token into an answer: (text now shown, finish reason or None to go on).

    A stop token ends the answer unrecorded; any other token is recorded, then a stop
    string or the length limit may end it.
    """
    if token in stops:
        return "", "stop_token"
    tokens.append(token)
    piece, stopped = text.push([token])
    if stopped:
        return piece, "stop_string"
    return piece, "length" if len(tokens) >= max_new else None



class Generation:
    """Streams one answer from prefilled (logits, state): iterate for text pieces.

    `.result` is available once iteration ends, and after `close()` or an exception
    (e.g. KeyboardInterrupt) during iteration, with finish_reason "interrupted".
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: RWKVTokenizer,
        logits: torch.Tensor,  # [1, V] after the prompt
        state: RWKVState,
        config: GenerationConfig,
        n_prompt_tokens: int = 0,
        t_start: float | None = None,
        on_finish: Callable[[GenerationResult], None] | None = None,
    ) -> None:
        self.lm = language_model(model)
        self.on_finish = on_finish
        self.config = config
        self.n_prompt_tokens = n_prompt_tokens
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.tokens: list[int] = []
        self.text = TextAssembler(tokenizer, config.stop_strings)
        self.sampler = Sampler(config, 1, logits.shape[-1], logits.device)
        # (logits, state, n_fed) replaced as one tuple so an interrupt never sees a half update
        self._snap: tuple[torch.Tensor, RWKVState, int] = (logits, state, 0)
        self._ttft: float | None = None
        self._reason: str | None = None
        self._stop_token: int | None = None
        self._result: GenerationResult | None = None
        self._gen = self._run()

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        if self._result is not None:
            raise StopIteration
        try:
            return next(self._gen)
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self._finish(interrupted=True)
            raise

    def close(self) -> GenerationResult:
        """Stops early (if still running) and returns the result."""
        if self._result is None:
            self._gen.close()
            self._finish(interrupted=True)
        assert self._result is not None
        return self._result

    def run(self) -> GenerationResult:
        """Consumes the whole stream and returns the result."""
        for _ in self:
            pass
        assert self._result is not None
        return self._result

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("the generation is still running: iterate it to the end or call close()")
        return self._result

    def _run(self) -> Iterator[str]:
        cfg = self.config
        stops = set(cfg.stop_tokens)
        while True:
            if len(self.tokens) >= cfg.max_new_tokens:
                self._reason = "length"
                break
            logits, state, _ = self._snap
            token = int(self.sampler(logits)[0])
            if self._ttft is None:
                self._ttft = time.perf_counter() - self.t_start
            piece, reason = take_token(token, self.tokens, self.text, stops, cfg.max_new_tokens)
            if piece:
                yield piece
            if reason == "stop_token":
                self._reason, self._stop_token = reason, token
                break
            if reason == "stop_string":
                self._reason = reason
                return
            if reason is None:
                logits, state = decode_step(self.lm, torch.tensor([token]), state)
                self._snap = (logits, state, len(self.tokens))
        tail = self.text.finish()
        if tail:
            yield tail

    def _finish(self, interrupted: bool = False) -> None:
        if self._result is not None:
            return
        reason = "interrupted" if interrupted or self._reason is None else self._reason
        text = self.text.emitted + (self.text.pending if reason == "interrupted" else "")
        _, state, n_fed = self._snap
        self._result = GenerationResult(
            text=text, token_ids=list(self.tokens), finish_reason=reason, stop_token=self._stop_token,
            n_prompt_tokens=self.n_prompt_tokens, ttft_s=self._ttft,
            total_s=time.perf_counter() - self.t_start, state=state, n_fed=n_fed,
        )  # fmt: skip
        if self.on_finish is not None:
            self.on_finish(self._result)


def generate_stream(
    model: torch.nn.Module,
    tokenizer: RWKVTokenizer,
    input_ids: Sequence[int],
    images: dict[str, torch.Tensor] | None = None,
    config: GenerationConfig | None = None,
    state: RWKVState | None = None,
    **options: Any,
) -> Generation:
    """Prefills `input_ids` (+ images) from `state` and returns the streaming `Generation`."""
    cfg = make_config(config, **options)
    t0 = time.perf_counter()
    logits, state = prefill(model, input_ids, images, state)
    return Generation(model, tokenizer, logits, state, cfg, n_prompt_tokens=len(input_ids), t_start=t0)


def generate(
    model: torch.nn.Module,
    tokenizer: RWKVTokenizer,
    input_ids: Sequence[int],
    images: dict[str, torch.Tensor] | None = None,
    config: GenerationConfig | None = None,
    state: RWKVState | None = None,
    **options: Any,
) -> GenerationResult:
    """One answer, not streamed."""
    return generate_stream(model, tokenizer, input_ids, images, config, state, **options).run()


@dataclass
class _Row:
    """One sample in the decoding batch."""

    index: int
    n_prompt: int
    t_start: float
    text: TextAssembler
    tokens: list[int] = field(default_factory=list)
    ttft: float | None = None


def generate_many(
    model: torch.nn.Module,
    tokenizer: RWKVTokenizer,
    prompts: Sequence[Sequence[int]],
    images: Sequence[dict[str, torch.Tensor] | None] | None = None,
    config: GenerationConfig | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> Iterator[tuple[int, GenerationResult]]:
    """Answers many prompts, yielding (prompt index, result) as samples finish.

    `images[i]` is prompt i's {tower: [N_i, 3, S, S]} (or None). Up to `batch_size`
    samples decode together; results carry no state. Sampling uses one generator for the
    batch, so only greedy outputs are independent of the batching.
    """
    cfg = config or GenerationConfig()
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lm = language_model(model)
    stops = set(cfg.stop_tokens)
    queue = list(range(len(prompts)))[::-1]  # pop() takes the next prompt in order
    rows: list[_Row] = []
    logits: torch.Tensor | None = None
    state: RWKVState | None = None
    sampler: Sampler | None = None
    if progress is not None:
        progress.start("generating", total=len(prompts))

    def finished(row: _Row, reason: str, stop_token: int | None = None) -> GenerationResult:
        text = row.text.emitted + (row.text.finish() if reason != "stop_string" else "")
        if progress is not None:
            progress.update(1)
        return GenerationResult(text=text, token_ids=row.tokens, finish_reason=reason, stop_token=stop_token,
                                n_prompt_tokens=row.n_prompt, ttft_s=row.ttft,
                                total_s=time.perf_counter() - row.t_start)  # fmt: skip

    try:
        while queue or rows:
            new_logits, new_states = [], []
            while queue and len(rows) + len(new_states) < batch_size:
                i = queue.pop()
                t0 = time.perf_counter()
                out, st = prefill(model, prompts[i], images[i] if images is not None else None)
                row = _Row(i, len(prompts[i]), t0, TextAssembler(tokenizer, cfg.stop_strings))
                if cfg.max_new_tokens == 0:
                    yield i, finished(row, "length")
                    continue
                rows.append(row)
                new_logits.append(out)
                new_states.append(st)
            if new_states:
                logits = torch.cat(([logits] if logits is not None else []) + new_logits)
                state = RWKVState.cat(([state] if state is not None else []) + new_states)
                if sampler is None:
                    sampler = Sampler(cfg, len(rows), logits.shape[-1], logits.device)
                else:
                    sampler.extend(len(new_states))
            if not rows:
                continue
            assert logits is not None and state is not None and sampler is not None
            tokens = sampler(logits)
            now = time.perf_counter()
            keep: list[int] = []
            for j, (row, token) in enumerate(zip(rows, tokens.tolist())):
                if row.ttft is None:
                    row.ttft = now - row.t_start
                _, reason = take_token(token, row.tokens, row.text, stops, cfg.max_new_tokens)
                if reason is None:
                    keep.append(j)
                else:
                    yield row.index, finished(row, reason, token if reason == "stop_token" else None)
            if not keep:
                rows, logits, state, sampler = [], None, None, None
                continue
            if len(keep) < len(rows):
                rows = [rows[j] for j in keep]
                state = state.select(keep)
                sampler.select(keep)
                tokens = tokens[torch.as_tensor(keep, device=tokens.device)]
            logits, state = decode_step(lm, tokens, state)
    finally:
        if progress is not None:
            progress.close()


def generate_batch(
    model: torch.nn.Module,
    tokenizer: RWKVTokenizer,
    prompts: Sequence[Sequence[int]],
    images: Sequence[dict[str, torch.Tensor] | None] | None = None,
    config: GenerationConfig | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[GenerationResult]:
    """`generate_many` collected in input order."""
    out: list[GenerationResult | None] = [None] * len(prompts)
    for i, result in generate_many(model, tokenizer, prompts, images, config, batch_size, progress):
        out[i] = result
    return out  # type: ignore[return-value]


__all__ = [
    "Generation",
    "GenerationResult",
    "TextAssembler",
    "decode_step",
    "generate",
    "generate_batch",
    "generate_many",
    "generate_stream",
    "prefill",
    "take_token",
]
