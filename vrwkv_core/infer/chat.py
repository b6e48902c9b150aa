"""ChatSession: multi-turn chat about images in RNN mode, with an image-state cache.

Notable:
- The conversation is never re-encoded. Each turn feeds only its new tokens from the
  previous turn's state: the previous answer's unfed tokens and its closing `\\n\\n`
  (id 261), then `User: {question}\\n\\n` and `Assistant:` (the v7.00 template of
  `vrwkv_core.data.conversation`, so the ids equal one long encoded conversation).
- Images go at the front of the next human turn (`add_image` queues them), or, when the
  model's `image_position` is `middle` (VisualRWKV v6.0), between the question without
  its short-answer line and the question (`User: {q'}\\n<image rows>\\n{q}\\n\\n`).
- The first turn of a conversation splits after the last image placeholder: the state
  there depends only on the images and the text before them, so it is cached under the
  image content (sha256 of the RGB bytes and the size) and the ids before the split. A
  second question about the same image (after `reset()`, or in another session sharing
  nothing but this object) skips the towers and the image prefill and only runs the
  question's few tokens; with `middle` placement only when the text before the image
  is the same too.
- When a stop string ends an answer, the state has seen the stop string's tokens.
- `save_state(path)` writes the RNN state as safetensors at `path` and the conversation
  (turns, pending ids, model dims) as JSON beside it (`path` with suffix `.json`);
  images queued but not yet asked about, and the cache, are not saved.

    chat = ChatSession(vlm, tok)
    chat.add_image(Image.open("cat.jpg"))
    for piece in chat.ask("What is in the image?", max_new_tokens=128):
        print(piece, end="")
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from vrwkv_core.data.conversation import IMAGE_MARKER, encode_generation_prompt, left_pad
from vrwkv_core.errors import CheckpointError, DataError, VrwkvError
from vrwkv_core.fsutil import atomic_write_text
from vrwkv_core.infer.generate import Generation, GenerationResult, prefill
from vrwkv_core.infer.sampling import DOUBLE_NEWLINE, IMAGE_TOKEN_ID, GenerationConfig, make_config
from vrwkv_core.model.rwkv.state import RWKVState
from vrwkv_core.textio import path_problem
from vrwkv_core.tokenizer import default_tokenizer

if TYPE_CHECKING:
    from vrwkv_core.tokenizer import RWKVTokenizer

MAX_IMAGE_PIXELS = 100_000_000
"""Larger images are refused (decompression-bomb guard, as in `data.validate.ImageLimits`)."""
STATE_FORMAT = "vrwkv-chat"


class ContextLengthWarning(UserWarning):
    """The conversation is longer than the model's training context (RNN mode still works)."""


def load_image(path: str | os.PathLike | bytes, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "image") -> Image.Image:
    """Opens an image file fully decoded as RGB; DataError for a missing, unreadable or huge file.

    The size is checked from the header before any pixel is decoded. `bytes` is an encoded
    image held in memory (MMBench embeds its images in the TSV), called `name` in errors.
    """
    if isinstance(path, bytes):
        label, source = name, io.BytesIO(path)
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise DataError(f"{path}: image file not found")
        if not path.is_file():
            raise DataError(f"{path}: not a file")
        label, source = str(path), path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DataError(f"{label}: image is {w}x{h} = {w * h:,} pixels, more than the {max_pixels:,} allowed",
                                    hint="a decompression bomb or a huge scan: resize it first")  # fmt: skip
                im.load()
                return im.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{label}: image too large ({err})") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{label}: not an image file (PIL cannot identify it)") from None
    except Exception as err:  # truncated or corrupt files raise OSError, SyntaxError, ValueError...
        raise DataError(f"{label}: cannot decode the image ({type(err).__name__}: {err})") from None


def image_key(image: Image.Image) -> str:
    """sha256 of the RGB pixels and the size: equal images share cached states."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


@dataclass
class _Image:
    key: str
    views: list[Image.Image]
    """What the model sees of it: the image, or with tiling its global view + tiles (made once)."""


class ChatSession:
    """A conversation with a VisualRWKV in RNN mode (see the module docstring)."""

    def __init__(
        self,
        vlm: torch.nn.Module,
        tokenizer: RWKVTokenizer | None = None,
        config: GenerationConfig | None = None,
        ctx_len: int | None = None,
        cache_size: int = 8,
        prefill_pad: bool = True,
    ) -> None:
        """`config`: default generation knobs (per-call options override them);
        `ctx_len`: the training context, past which `ask` warns (ContextLengthWarning);
        `cache_size`: image sets whose post-image state is kept (least recently used out);
        `prefill_pad`: pad the first prefill of a conversation as the model's release did
        (`Family.prefill_pad`: v7.00 to a multiple of 16 with token 261; follow-ups unpadded)."""
        if tokenizer is None:
            tokenizer = default_tokenizer()
        self.vlm = vlm
        self.tok = tokenizer
        self.config = config or GenerationConfig()
        self.ctx_len = ctx_len
        self.cache_size = cache_size
        family = getattr(vlm, "family", None)
        self.pad_multiple = family.prefill_pad if (prefill_pad and family is not None) else 0
        self.cache_hits = 0
        self.cache_misses = 0
        self._cache: OrderedDict[tuple[str, ...], RWKVState] = OrderedDict()
        self._queued: list[_Image] = []
        self._active: Generation | None = None
        self.last_result: GenerationResult | None = None
        self.reset(keep_images=False)

    # conversation bookkeeping -------------------------------------------------------------

    def reset(self, keep_images: bool = True) -> None:
        """Forgets the conversation (the image-state cache stays). With `keep_images`, the
        conversation's images are queued again for the next question."""
        self._close_active()
        conv = getattr(self, "_conv_images", [])
        self._queued = (conv + self._queued) if keep_images else []
        self._conv_images: list[_Image] = []
        self.state: RWKVState | None = None
        self.pending_ids: list[int] = []
        self.turns: list[dict[str, Any]] = []
        self.n_tokens = 0
        self._warned = False
        self._retry: tuple[torch.Tensor, RWKVState, int, GenerationConfig, int] | None = None

    @property
    def queued_images(self) -> int:
        """Images waiting for the next question."""
        return len(self._queued)

    def add_image(self, image: Image.Image | str | os.PathLike) -> str:
        """Queues an image (PIL or a path) for the next question; returns its content key."""
        if not hasattr(image, "convert"):
            image = load_image(image)  # type: ignore[arg-type]
        rgb = image.convert("RGB")
        key = image_key(rgb)
        self._queued.append(_Image(key, self.vlm.image_processor.views(rgb)))
        return key

    # asking -------------------------------------------------------------------------------

    def ask(self, text: str, config: GenerationConfig | None = None, **options: Any) -> Generation:
        """Asks a question about the queued images (if any) and the conversation so far.

        Returns the streaming answer: iterate it for text pieces; `.result` afterwards.
        Options are `GenerationConfig` fields (max_new_tokens, temperature, top_p, ...).
        """
        question = text.replace(IMAGE_MARKER, "").strip()
        if not question:
            raise VrwkvError("empty prompt: type a question")
        cfg = make_config(config or self.config, **options)
        self._close_active()
        t0 = time.perf_counter()
        images = self._queued
        n_slots = [len(im.views) for im in images]
        P = self.vlm.tokens_per_image
        position = getattr(self.vlm.config, "image_position", "first")
        ids = encode_generation_prompt(question, self.tok, P, n_images=sum(n_slots), image_position=position)
        if self.state is None:  # the first prefill of the conversation (the pad is part of any cache key)
            ids = left_pad(len(ids), self.pad_multiple) + ids
        if self.state is None and images:
            logits, state = self._prefill_first_turn(ids, images)
        else:
            ids = self.pending_ids + ids
            processed = self._process(images) if images else None
            logits, state = prefill(self.vlm, ids, processed, self.state)
        self.n_tokens += len(ids) - len(self.pending_ids)  # pending ids were counted with their answer
        self.turns.append({"role": "user", "text": question, "images": [im.key for im in images]})
        self._conv_images.extend(images)
        self._queued = []
        self.state, self.pending_ids = state, []
        self._retry = (logits, state, self.n_tokens, cfg, len(self.turns))
        self._check_context()
        return self._start(logits, state, cfg, len(ids), t0)

    def retry(self, config: GenerationConfig | None = None, **options: Any) -> Generation:
        """Answers the last question again (from the state before its answer)."""
        if self._retry is None:
            raise VrwkvError("nothing to retry: ask a question first")
        self._close_active()
        logits, state, n_tokens, last_cfg, n_turns = self._retry
        cfg = make_config(config or last_cfg, **options)
        del self.turns[n_turns:]
        self.state, self.pending_ids, self.n_tokens = state, [], n_tokens
        return self._start(logits, state, cfg, 0, time.perf_counter())

    def _start(self, logits: torch.Tensor, state: RWKVState, cfg: GenerationConfig, n_prompt: int, t0: float) -> Generation:
        gen = Generation(self.vlm, self.tok, logits, state, cfg, n_prompt_tokens=n_prompt, t_start=t0,
                         on_finish=self._answered)  # fmt: skip
        self._active = gen
        return gen

    def _answered(self, result: GenerationResult) -> None:
        """Records an answer: its state, and what the next turn must feed first."""
        self.state = result.state
        self.pending_ids = result.unfed_ids + [DOUBLE_NEWLINE]  # the answer's closing "\n\n"
        self.n_tokens += len(result.token_ids) + 1
        self.turns.append({"role": "assistant", "text": result.text})
        self.last_result = result
        self._active = None

    def _close_active(self) -> None:
        if self._active is not None and not self._active.done:
            self._active.close()
        self._active = None

    def _prefill_first_turn(self, ids: list[int], images: list[_Image]) -> tuple[torch.Tensor, RWKVState]:
        """Runs the prompt up to its last image from the cache (or the towers), then the rest."""
        split = max(i for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID) + 1
        key = (*(im.key for im in images), _ids_key(ids[:split]))
        state = self._cache.get(key)
        if state is not None:
            self.cache_hits += 1
            self._cache.move_to_end(key)
        else:
            self.cache_misses += 1
            _, state = prefill(self.vlm, ids[:split], self._process(images))
            if self.cache_size > 0:
                self._cache[key] = state
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return prefill(self.vlm, ids[split:], None, state)

    def _process(self, images: list[_Image]) -> dict[str, torch.Tensor]:
        return self.vlm.image_processor.batch([v for im in images for v in im.views])

    def _check_context(self) -> None:
        if self.ctx_len and self.n_tokens > self.ctx_len and not self._warned:
            self._warned = True
            warnings.warn(
                f"the conversation is {self.n_tokens} tokens, longer than the {self.ctx_len} the model was "
                "trained on; answers may degrade (/reset starts over)",
                ContextLengthWarning,
                stacklevel=3,
            )

    def clear_cache(self) -> None:
        """Drops every cached image state."""
        self._cache.clear()

    # persistence --------------------------------------------------------------------------

    def save_state(self, path: str | os.PathLike) -> Path:
        """Writes the RNN state (safetensors, at `path`) and the conversation (JSON, returned)."""
        self._close_active()
        if self.state is None:
            raise VrwkvError("nothing to save yet: ask a question first")
        path = Path(path).expanduser()
        meta_path = _meta_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.state.save(path)
        except (OSError, ValueError) as err:  # a file where a folder is needed, no permission, a NUL byte
            where = err.filename if isinstance(err, OSError) and err.filename else path
            raise VrwkvError(f"{path}: cannot save the chat state ({where}: {path_problem(path, err)})") from None
        meta = {
            "format": STATE_FORMAT,
            "version": 1,
            "model": self._model_dims(),
            "turns": self.turns,
            "pending_ids": self.pending_ids,
            "n_tokens": self.n_tokens,
        }
        atomic_write_text(meta_path, json.dumps(meta, ensure_ascii=False, indent=1))
        return meta_path

    def load_state(self, path: str | os.PathLike) -> None:
        """Restores a conversation written by `save_state` (queued images are dropped)."""
        path = Path(path).expanduser()
        meta_path = _meta_path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: saved chat state not found")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{meta_path}: conversation file missing (save_state writes it beside {path.name})") from None
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{meta_path}: cannot read the conversation ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{meta_path}: not a conversation written by ChatSession.save_state")
        dims = self._model_dims()
        if meta.get("model") != dims:
            raise CheckpointError(f"{path}: saved with a different model ({meta.get('model')}), this one is {dims}")
        state = RWKVState.load(path, device=self.vlm.device, model=self.vlm.rwkv).to(dtype=self.vlm.dtype)
        try:
            pending = [int(t) for t in meta.get("pending_ids", [])]
            turns, n_tokens = list(meta.get("turns", [])), int(meta.get("n_tokens", 0))
        except (TypeError, ValueError):
            raise CheckpointError(f"{meta_path}: damaged conversation (pending_ids, turns, n_tokens)") from None
        if any(not 0 <= t < self.vlm.rwkv.vocab_size for t in pending):
            raise CheckpointError(f"{meta_path}: pending_ids outside the vocabulary")
        self.reset(keep_images=False)
        self.state, self.turns, self.pending_ids, self.n_tokens = state, turns, pending, n_tokens

    def _model_dims(self) -> dict[str, int]:
        lm = self.vlm.rwkv
        return {"n_layer": lm.n_layer, "n_embd": lm.n_embd, "head_size": lm.head_size,
                "vocab_size": lm.vocab_size, "tokens_per_image": self.vlm.tokens_per_image}  # fmt: skip


def _ids_key(ids: list[int]) -> str:
    """sha256 of a token id list (the text around the images in a cache key)."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def _meta_path(path: Path) -> Path:
    if path.suffix == ".json":
        raise VrwkvError(f"{path}: give the state file's path (the .json is written beside it)")
    return path.with_suffix(".json")


__all__ = ["ChatSession", "ContextLengthWarning", "image_key", "load_image"]
