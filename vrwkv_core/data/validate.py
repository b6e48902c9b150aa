"""Checks for one LLaVA record and its images, used by `vrwkv prepare-data llava`.

`RecordChecker.check` turns a raw record into either a normalised record (image always
a list, roles lower case, markers at the front of human turns, blank lines collapsed)
or a reject reason. Reasons are short fixed categories (the stats histogram keys) plus
a detail string. Image paths are resolved (symlinks followed) and must stay inside the
image folder; each image must decode fully and have a sane size.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from vrwkv_core.data.conversation import IMAGE_MARKER, Tokenizer, encode_conversation_info, normalize_turn_text

# Reject categories (keys of stats.json's "reject_reasons").
INVALID_JSON = "invalid json"
NOT_AN_OBJECT = "record is not an object"
BAD_CONVERSATIONS = "bad conversations"
BAD_ROLES = "bad roles"
EMPTY_TURN = "empty turn"
MARKER_IN_GPT_TURN = "image marker in a gpt turn"
MARKER_MISMATCH = "marker count != image count"
BAD_IMAGE_FIELD = "bad image field"
ABSOLUTE_PATH = "absolute image path"
ESCAPING_PATH = "image path escapes the image folder"
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "image does not decode"
IMAGE_TOO_SMALL = "image too small"
IMAGE_TOO_LARGE = "image too large"


@dataclass(frozen=True)
class ImageLimits:
    """Sane-size bounds for an image; `max_pixels` also guards against decompression bombs."""

    min_side: int = 10
    max_side: int = 16384
    max_pixels: int = 100_000_000


@dataclass
class CheckResult:
    """Outcome for one source record: `record` when good, `reason` (+ `detail`) when not."""

    index: int
    line: int | None
    id: Any = None
    record: dict | None = None
    record_json: str | None = None
    """The good record serialised (set by the prepare pipeline, which drops `record`)."""
    reason: str | None = None
    detail: str = ""
    n_images: int = 0
    n_chars: int = 0
    n_tokens: int | None = None


class Reject(Exception):
    """Internal: a record fails a check."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def check_image_file(path: Path, limits: ImageLimits) -> None:
    """Raise Reject unless `path` decodes fully and has a sane size."""
    if not path.is_file():
        raise Reject(MISSING_IMAGE, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limits.max_pixels or max(w, h) > limits.max_side:
                    raise Reject(IMAGE_TOO_LARGE, f"{path} is {w}x{h}")
                im.verify()  # structure and checksums, before paying for a full decode
            with Image.open(path) as im:
                im.load()
    except Reject:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Reject(IMAGE_TOO_LARGE, f"{path}: {e}") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise Reject(CORRUPT_IMAGE, f"{path}: {type(e).__name__}: {e}") from None
    if min(w, h) < limits.min_side:
        raise Reject(IMAGE_TOO_SMALL, f"{path} is {w}x{h}")


class RecordChecker:
    """Validates and normalises records; caches per-image verdicts (images repeat across records)."""

    def __init__(
        self,
        image_folder: str | os.PathLike,
        limits: ImageLimits = ImageLimits(),
        tokenizer: Tokenizer | None = None,
        tokens_per_image: int | None = None,
        ctx_len: int | None = None,
        cache_size: int = 8192,
    ) -> None:
        self.image_folder = Path(image_folder)
        self.root = self.image_folder.resolve()
        self.limits = limits
        self.tokenizer = tokenizer
        self.tokens_per_image = tokens_per_image
        self.ctx_len = ctx_len
        self._cache: OrderedDict[str, Reject | None] = OrderedDict()
        self._cache_size = cache_size

    def check(self, index: int, line: int | None, record: Any) -> CheckResult:
        res = CheckResult(index=index, line=line)
        if not isinstance(record, dict):
            res.reason, res.detail = NOT_AN_OBJECT, type(record).__name__
            return res
        res.id = record.get("id")
        try:
            res.record = self._normalise(record)
        except Reject as r:
            res.reason, res.detail = r.reason, r.detail
            return res
        res.n_images = len(res.record["image"])
        res.n_chars = sum(len(t["value"]) for t in res.record["conversations"])
        if self.tokenizer is not None and self.tokens_per_image is not None:
            enc = encode_conversation_info(res.record["conversations"], self.tokenizer, self.tokens_per_image)
            res.n_tokens = enc.n_tokens_full
        return res

    def _normalise(self, record: dict) -> dict:
        images = self._image_list(record)
        turns = self._turns(record, len(images))
        for rel in images:
            self._check_image(rel)
        out = dict(record)
        out["image"] = images
        out["conversations"] = turns
        return out

    @staticmethod
    def _image_list(record: dict) -> list[str]:
        image = record.get("image")
        if image is None:
            return []
        if isinstance(image, str):
            image = [image]
        if not isinstance(image, list) or not all(isinstance(p, str) and p.strip() for p in image):
            raise Reject(BAD_IMAGE_FIELD, repr(image)[:200])
        return image

    @staticmethod
    def _turns(record: dict, n_images: int) -> list[dict]:
        conv = record.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise Reject(BAD_CONVERSATIONS, "missing or empty 'conversations' list")
        turns = []
        n_markers = 0
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise Reject(BAD_CONVERSATIONS, f"turn {i} is not {{'from', 'value': str}}")
            role = turn.get("from")
            role = role.lower() if isinstance(role, str) else role
            expected = "human" if i % 2 == 0 else "gpt"
            if role != expected:
                raise Reject(BAD_ROLES, f"turn {i} is from {turn.get('from')!r}, expected {expected!r}")
            value = turn["value"]
            markers = value.count(IMAGE_MARKER)
            if markers and role == "gpt":
                raise Reject(MARKER_IN_GPT_TURN, f"turn {i}")
            if not value.replace(IMAGE_MARKER, "").strip() and not markers:
                raise Reject(EMPTY_TURN, f"turn {i} ({role})")
            n_markers += markers
            turns.append({**turn, "from": role, "value": normalize_turn_text(role, value)})
        if len(turns) % 2:
            raise Reject(BAD_ROLES, "the last turn is from 'human' (no answer to learn)")
        if n_markers != n_images:
            raise Reject(MARKER_MISMATCH, f"{n_markers} {IMAGE_MARKER} markers, {n_images} images")
        return turns

    def _check_image(self, rel: str) -> None:
        cached = self._cache.get(rel, False)
        if cached is False:
            try:
                self._check_image_uncached(rel)
                cached = None
            except Reject as r:
                cached = r
            self._cache[rel] = cached
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(rel)
        if cached is not None:
            raise cached

    def _check_image_uncached(self, rel: str) -> None:
        if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[0].isalpha() and rel[1] == ":"):
            raise Reject(ABSOLUTE_PATH, rel)
        if "\x00" in rel:
            raise Reject(BAD_IMAGE_FIELD, f"{rel!r}: NUL byte in the path")
        path = self.image_folder / rel
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as e:  # symlink loops
            raise Reject(MISSING_IMAGE, f"{rel}: {e}") from None
        if ".." in Path(rel).parts or not resolved.is_relative_to(self.root):
            raise Reject(ESCAPING_PATH, rel)
        check_image_file(resolved, self.limits)


def make_checker(
    image_folder: str | os.PathLike,
    limits: ImageLimits,
    tokenizer_factory: Callable[[], Tokenizer] | None,
    tokens_per_image: int | None,
    ctx_len: int | None,
) -> RecordChecker:
    """Build a checker (in a worker process: the tokenizer is built there, not pickled)."""
    tokenizer = tokenizer_factory() if tokenizer_factory is not None else None
    return RecordChecker(image_folder, limits, tokenizer, tokens_per_image, ctx_len)


__all__ = ["CheckResult", "ImageLimits", "RecordChecker", "check_image_file", "make_checker"]
