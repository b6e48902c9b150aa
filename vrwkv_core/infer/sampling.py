"""Logits processing and sampling: the knobs of `GenerationConfig` applied to [B, V] logits.

Order per step (as the RWKV pipelines do it): banned tokens -> -inf; penalties
`logit -= presence * [seen] + frequency * count` over tokens generated so far; then
greedy argmax (temperature 0), or softmax(logits / temperature) restricted to the top-k
tokens and to the smallest set whose mass reaches top_p, sampled with a seeded
`torch.Generator`. After each step every count decays (`count *= penalty_decay`,
RWKV's `alpha_decay`, 0.996 in ChatRWKV) and the chosen token's count grows by one, so
repetitions long ago weigh less than recent ones. A token stays "seen" for the presence
penalty once generated. Penalties look at generated tokens only, not at the prompt.

    sampler = Sampler(GenerationConfig(temperature=0.8, top_p=0.9, seed=0), batch=1, vocab=65536)
    token = sampler(logits)          # [B] long; updates the penalty counts
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch

from vrwkv_core.errors import VrwkvError

END_OF_TEXT = 0
DOUBLE_NEWLINE = 261  # "\n\n": ends an answer
IMAGE_TOKEN_ID = 65535  # placeholder for image features: never generated


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick the next tokens and when to stop."""

    max_new_tokens: int = 256
    """Longest answer in tokens (the stop token is not counted)."""
    temperature: float = 0.0
    """Softmax temperature; 0 is greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated so far."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per (decayed) occurrence."""
    penalty_decay: float = 0.996
    """Occurrence counts are multiplied by this after every step (RWKV's alpha_decay)."""
    banned_tokens: tuple[int, ...] = (IMAGE_TOKEN_ID,)
    """Tokens never generated (the image placeholder is banned by default)."""
    stop_tokens: tuple[int, ...] = (DOUBLE_NEWLINE, END_OF_TEXT)
    """Tokens that end the answer; they are not part of it."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end the answer; the text is cut before them."""
    seed: int | None = None
    """Sampling seed (None: nondeterministic)."""

    def __post_init__(self) -> None:
        # Lists from callers become tuples so configs stay hashable and immutable.
        for name in ("banned_tokens", "stop_tokens", "stop_strings"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if self.max_new_tokens < 0:
            raise VrwkvError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise VrwkvError(f"temperature must be finite and >= 0 (0 is greedy), got {self.temperature}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise VrwkvError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise VrwkvError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise VrwkvError(f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0.0 <= self.penalty_decay <= 1.0:
            raise VrwkvError(f"penalty_decay must be in [0, 1], got {self.penalty_decay}")
        if any(not s for s in self.stop_strings):
            raise VrwkvError("stop_strings must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_options(self, **options: Any) -> "GenerationConfig":
        """A copy with some knobs changed; unknown names are an error naming them."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise VrwkvError(f"unknown generation option(s): {', '.join(unknown)}",
                             hint=f"known options: {', '.join(sorted(known))}")  # fmt: skip
        return replace(self, **options)


def make_config(config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
    """`config` (default GenerationConfig()) with `options` applied on top."""
    return (config or GenerationConfig()).with_options(**options)


def apply_penalties(
    logits: torch.Tensor,  # [B, V] float32
    counts: torch.Tensor,  # [B, V] float32, decayed occurrence counts
    seen: torch.Tensor,  # [B, V] bool
    config: GenerationConfig,
) -> torch.Tensor:
    """logits - presence * seen - frequency * counts, with banned tokens at -inf (new tensor)."""
    out = logits.float().clone()
    if config.presence_penalty:
        out -= config.presence_penalty * seen.float()
    if config.frequency_penalty:
        out -= config.frequency_penalty * counts
    if config.banned_tokens:
        banned = [t for t in config.banned_tokens if 0 <= t < out.shape[-1]]
        out[:, banned] = float("-inf")
    return out


def sampling_probs(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """The distribution sampled from at temperature > 0: softmax(logits / T) restricted to
    top-k and top-p, renormalised. [B, V] -> [B, V] float32."""
    logits = logits.float() / config.temperature
    V = logits.shape[-1]
    if 0 < config.top_k < V:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if config.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        drop_sorted = before >= config.top_p  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class Sampler:
    """Picks one token per row from [B, V] logits and keeps the per-row penalty counts."""

    def __init__(
        self,
        config: GenerationConfig,
        batch: int,
        vocab: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.counts = torch.zeros(batch, vocab, device=self.device)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=self.device)
        self._track = bool(config.presence_penalty or config.frequency_penalty)
        if generator is None and not config.greedy:
            generator = torch.Generator(device=self.device)
            if config.seed is not None:
                generator.manual_seed(config.seed)
            else:
                generator.seed()
        self.generator = generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] logits -> [B] token ids; records them for the penalties."""
        cfg = self.config
        logits = apply_penalties(logits.to(self.device), self.counts, self.seen, cfg)
        if cfg.greedy:
            tokens = logits.argmax(-1)
        else:
            probs = sampling_probs(logits, cfg)
            tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        if self._track:
            self.counts.mul_(cfg.penalty_decay)
            rows = torch.arange(tokens.shape[0], device=self.device)
            self.counts[rows, tokens] += 1.0
            self.seen[rows, tokens] = True
        return tokens

    def select(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keeps only the batch rows `rows` (finished samples drop out)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        self.counts = self.counts[idx]
        self.seen = self.seen[idx]

    def extend(self, n: int) -> None:
        """Adds `n` fresh rows at the end (new samples join the batch)."""
        V = self.counts.shape[1]
        self.counts = torch.cat([self.counts, torch.zeros(n, V, device=self.device)])
        self.seen = torch.cat([self.seen, torch.zeros(n, V, dtype=torch.bool, device=self.device)])


__all__ = ["GenerationConfig", "Sampler", "apply_penalties", "make_config", "sampling_probs"]
