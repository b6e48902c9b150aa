"""Training data: `VisionLanguageDataset` over data.jsonl, `collate`, `ResumableSampler`.

The dataset keeps one file offset and one image key per record (not the records), so a
665k-record file costs about 10 MB; each worker process reopens the file. A sample is
tokenised with the v7.00 template (`conversation.py`; images in the `middle` of the human
turn for v6.0 recipes) and its images go through the model's image processor, an opaque
callable returning a tensor or a dict of tensors per tower.

A bad image raises DataError naming the file; with `skip_bad_images=True` the sample
becomes None and `collate` drops it and counts it in `batch["n_skipped"]` (never a zero
image), so the training loop can log it on every rank. `batch["n_truncated"]` counts
samples cut to ctx_len. With `blank_image` (v6.0) a text-only sample starts with the zero
rows of a blank image; `collate(align_images=True)` (v6.0) left-pads each sample with token 0
so that every sample's first image (or blank) run starts at the same position.

`ResumableSampler`'s order is a function of (seed, epoch); it shards by rank and
counts what it yields, so `state_dict()` / `load_state_dict()` resume at the next sample.
"""

from __future__ import annotations

import json
import logging
import math
import os
from array import array
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vrwkv_core.data.conversation import (
    BLANK_IMAGE_TOKEN_ID,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    Tokenizer,
    encode_conversation_info,
)
from vrwkv_core.errors import DataError
from vrwkv_core.fsutil import atomic_write_text
from vrwkv_core.textio import inside

log = logging.getLogger(__name__)


def _reject_reason(line: bytes, image_folder: Path) -> tuple[str | None, list[str]]:
    """Why a records line cannot be trained on (None when it can), and its image paths: the
    checks that need no tokenizer or image decoding, so a file of bad records fails before
    training starts."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason})", []
    except (json.JSONDecodeError, RecursionError) as e:
        return f"not valid JSON ({getattr(e, 'msg', 'nested too deeply')})", []
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})", []
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "missing or empty 'conversations' list", []
    images = record.get("image")
    images = [images] if isinstance(images, str) else images if images is not None else []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return "'image' is not a path or a list of paths", []
    for rel in images:
        if inside(image_folder, rel) is None:
            return f"image path {rel!r} escapes the image folder", []
    return None, images


def _index_lines(path: Path, image_folder: Path) -> tuple[array, array, list[dict]]:
    """Byte offset and image key of every usable non-blank line, and a reject entry for each
    other one. Records with the same image list share a key (-1: no image)."""
    offsets, image_keys = array("q"), array("q")
    key_of: dict[tuple[str, ...], int] = {}
    rejects: list[dict] = []
    pos = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                reason, images = _reject_reason(line, image_folder)
                if reason is None:
                    offsets.append(pos)
                    image_keys.append(key_of.setdefault(tuple(images), len(key_of)) if images else -1)
                else:
                    rejects.append({"line": lineno, "reason": reason})
            pos += len(line)
    return offsets, image_keys, rejects


def record_images(record: dict) -> list[str]:
    """A record's images as a list (LLaVA allows a string, a list, or no key)."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


class VisionLanguageDataset(Dataset):
    """Map-style dataset over a LLaVA/`prepare-data` JSONL file."""

    def __init__(
        self,
        records_path: str | os.PathLike,
        image_folder: str | os.PathLike,
        tokenizer: Tokenizer,
        image_processor: Callable[[Any], Any],
        tokens_per_image: int,
        ctx_len: int,
        skip_bad_images: bool = False,
        image_position: str = "first",
        truncation: str = "whole_images",
        rejects_path: str | os.PathLike | None = None,
        blank_image: bool = False,
    ) -> None:
        """`image_position`: where a human turn's images go (`first`, v6.0's `middle`, `last`);
        `truncation`: see `conversation.TRUNCATIONS`; `blank_image`: text-only samples start with
        a blank image's zero rows (v6.0, `Family.blank_image_rows`).

        Lines that cannot be used (bad JSON or UTF-8, no conversations, an image path that
        escapes `image_folder`) are skipped and listed in `self.rejects` (and written to
        `rejects_path` when given); a file with no usable line is a DataError.
        """
        self.records_path = Path(records_path)
        if not self.records_path.is_file():
            raise DataError(f"{self.records_path}: no such file", hint="run `vrwkv prepare-data llava` first")
        self.image_folder = Path(image_folder)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens_per_image = tokens_per_image
        self.ctx_len = ctx_len
        self.skip_bad_images = skip_bad_images
        self.image_position = image_position
        self.truncation = truncation
        self.blank_image = blank_image
        # image_keys[i]: which image list record i has (-1: none), to batch records of one image together
        self.offsets, self.image_keys, self.rejects = _index_lines(self.records_path, self.image_folder)
        if self.rejects and rejects_path is not None:
            lines = "".join(json.dumps({"file": str(self.records_path), **r}) + "\n" for r in self.rejects)
            atomic_write_text(rejects_path, lines)
        if not self.offsets:
            where = f": see {rejects_path}" if rejects_path is not None and self.rejects else ""
            raise DataError(f"no usable records in {self.records_path} ({len(self.rejects)} rejected{where})",
                            hint="check the file with `vrwkv prepare-data llava`")
        self.n_skipped = 0  # in this process only; collate's n_skipped covers DataLoader workers
        self._file = None
        self._file_pid = -1
        self._last_image: tuple[Path, Any] | None = None  # see load_image

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"], state["_file_pid"] = None, -1  # open handles do not cross processes
        return state

    def read_record(self, index: int) -> dict:
        """The raw JSON record at `index`."""
        if self._file is None or self._file_pid != os.getpid():
            self._file = open(self.records_path, "rb")
            self._file_pid = os.getpid()
        self._file.seek(self.offsets[index])
        line = self._file.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.records_path}: record {index} is not valid JSON ({e.msg})") from None

    def load_image(self, rel: str, index: int) -> Any:
        """Image `rel` of record `index` through the image processor (DataError when unreadable).

        The last image is kept: with `shared_prefix` an image's records come in runs, so a
        batch of 128 questions about 16 images decodes 16, not 128 (the callers only stack it).
        """
        path = self.image_folder / rel
        if self._last_image is not None and self._last_image[0] == path:
            return self._last_image[1]
        try:
            with Image.open(path) as im:
                im.seek(0)  # an animated image trains on its first frame
                rgb = im.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files
            raise DataError(
                f"{path}: cannot load image of record {index} ({type(e).__name__}: {e})",
                hint="set data.skip_bad_images=true to drop such samples, or check the data with `vrwkv prepare-data llava`",
            ) from None
        pixels = self.image_processor(rgb)
        self._last_image = (path, pixels)
        return pixels

    def __getitem__(self, index: int) -> dict | None:
        record = self.read_record(index)
        conversations = record.get("conversations")
        if not conversations:
            raise DataError(f"{self.records_path}: record {index} has no conversations")
        try:
            enc = encode_conversation_info(conversations, self.tokenizer, self.tokens_per_image, self.ctx_len,
                                           self.image_position, self.truncation, self.blank_image)  # fmt: skip
        except DataError as e:
            raise DataError(f"{self.records_path}: record {index}: {e}") from None
        images = record_images(record)
        if enc.n_images != len(images):
            raise DataError(f"{self.records_path}: record {index} has {enc.n_images} <image> markers and {len(images)} images")
        try:
            # images whose placeholders were truncated away are not loaded
            pixels = [self.load_image(rel, index) for rel in images[enc.first_image : enc.first_image + enc.n_images_kept]]
        except DataError as e:
            if not self.skip_bad_images:
                raise
            self.n_skipped += 1
            log.warning("skipping sample %d: %s", index, e)
            return None
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "images": pixels,
            "truncated": enc.truncated,
            "partial_image": enc.image_rows is not None,
            "index": index,
            "id": record.get("id"),
            "image_key": self.image_keys[index],
        }


def stack_images(images: Sequence[Any]) -> Any:
    """Processed images (tensors or {tower: tensor}) stacked into one batch."""
    if isinstance(images[0], dict):
        return {key: torch.stack([im[key] for im in images]) for key in images[0]}
    return torch.stack(list(images))


def first_image_row(input_ids: torch.Tensor) -> int:
    """Position of a sample's first image or blank-image placeholder (0 when it has none)."""
    rows = ((input_ids == IMAGE_TOKEN_ID) | (input_ids == BLANK_IMAGE_TOKEN_ID)).nonzero()
    return int(rows[0]) if len(rows) else 0


def collate(batch: Sequence[dict | None], pad_to: int | None = None, align_images: bool = False) -> dict | None:
    """Right-pad ids with 0 and labels with -100 (to `pad_to` when given, as the original pads
    every sample to ctx_len); stack all images of the batch in order.

    `align_images` (v6.0): first left-pad each sample with id 0 (label -100) so that its first
    image or blank run starts where the batch's latest one does, as the original's
    `preparing_embedding` does; a sample is never cut after that (it may outgrow `pad_to`).

    Returns input_ids/labels [B, T], images (tensor or dict of [N_img, 3, H, W], or None),
    image_counts [B], n_skipped (dropped None samples), n_truncated, ids, lengths [B] (each
    row's unpadded length), image_keys [B] (the dataset's key of each row's images, -1: none).
    Returns None when every sample was dropped.
    """
    samples = [s for s in batch if s is not None]
    n_skipped = len(batch) - len(samples)
    if not samples:
        return None
    starts = [first_image_row(s["input_ids"]) if align_images else 0 for s in samples]
    left = [max(starts) - start for start in starts]
    t_max = max([pad + len(s["input_ids"]) for pad, s in zip(left, samples)] + [pad_to or 0])
    input_ids = torch.full((len(samples), t_max), PAD_TOKEN_ID, dtype=torch.long)
    labels = torch.full((len(samples), t_max), IGNORE_INDEX, dtype=torch.long)
    for i, (pad, s) in enumerate(zip(left, samples)):
        n = len(s["input_ids"])
        input_ids[i, pad : pad + n] = s["input_ids"]
        labels[i, pad : pad + n] = s["labels"]
    all_images = [im for s in samples for im in s["images"]]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "images": stack_images(all_images) if all_images else None,
        "image_counts": torch.tensor([len(s["images"]) for s in samples], dtype=torch.long),
        "n_skipped": n_skipped,
        "n_truncated": sum(bool(s.get("truncated")) for s in samples),
        "partial_images": any(s.get("partial_image") for s in samples),
        "ids": [s.get("id") for s in samples],
        "lengths": torch.tensor([pad + len(s["input_ids"]) for pad, s in zip(left, samples)], dtype=torch.long),
        "image_keys": torch.tensor([s.get("image_key", -1) for s in samples], dtype=torch.long),
    }


class ResumableSampler(Sampler[int]):
    """Seeded, sharded, resumable order over `range(dataset_len)`.

    Each epoch's global order is a permutation drawn from (seed, epoch) (identity when
    `shuffle=False`), padded by wrapping around (or trimmed with `drop_last`) to a multiple
    of `world_size`; rank r takes positions r, r+W, r+2W... so shards are disjoint and of
    equal length. The sampler counts the indices it has yielded in the current epoch:
    `state_dict()` saves that count and `load_state_dict()` makes the next iteration start
    right after it. Note that a DataLoader pulls indices ahead of the training step (its
    prefetch), so a training loop that wants the exact position saves
    `{"epoch": e, "consumed": samples_done_on_this_rank}` instead of `state_dict()`.

    With `group_keys` (one key per index, -1: none) and `group_size` K > 1, the shuffled
    order is regrouped: the indices of each key come in runs of up to K (in shuffled order),
    the runs themselves shuffled, so a batch holds K records of one image whose shared
    prefix `train.branching` runs once. A single rank gets the runs whole.
    """

    def __init__(self, dataset_len: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 drop_last: bool = False, group_keys: Sequence[int] | None = None, group_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if dataset_len <= 0:
            raise DataError("the dataset is empty")
        if drop_last and dataset_len < world_size:
            raise DataError(f"{dataset_len} samples cannot feed {world_size} ranks with drop_last")
        self.dataset_len = dataset_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        if drop_last:
            self.num_samples = dataset_len // world_size
        else:
            self.num_samples = math.ceil(dataset_len / world_size)
        self.epoch = 0
        self.consumed = 0
        if group_keys is not None and len(group_keys) != dataset_len:
            raise ValueError(f"{len(group_keys)} group keys for {dataset_len} samples")
        self.group_keys = group_keys if group_size > 1 else None
        self.group_size = group_size

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; calling it again with the current epoch keeps a resumed position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list for `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
            if self.group_keys is not None:
                order = self._grouped(order, g)
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        if total > len(order):
            order = (order * math.ceil(total / len(order)))[:total]
        else:
            order = order[:total]
        return order[self.rank : total : self.world_size]

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        """`order` regrouped into shuffled runs of up to group_size indices with one key."""
        by_key: dict[int, list[int]] = {}
        runs: list[list[int]] = []
        for i in order:
            key = self.group_keys[i]
            if key < 0:
                runs.append([i])
                continue
            run = by_key.setdefault(key, [])
            run.append(i)
            if len(run) == self.group_size:
                runs.append(run)
                del by_key[key]
        runs += by_key.values()
        return [i for j in torch.randperm(len(runs), generator=g).tolist() for i in runs[j]]

    def __iter__(self) -> Iterator[int]:
        if self.consumed >= self.num_samples:  # a finished epoch iterated again without set_epoch
            self.consumed = 0
        idx = self.indices()
        while self.consumed < self.num_samples:
            i = idx[self.consumed]
            self.consumed += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "world_size": self.world_size, "dataset_len": self.dataset_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; a different world size resumes at the same global position."""
        for key in ("seed", "dataset_len"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"sampler state was saved with {key}={state[key]}, this run has {getattr(self, key)}",
                                hint="resume with the same data and seed")
        self.epoch = int(state["epoch"])
        consumed = int(state["consumed"])
        old_ws = int(state.get("world_size", self.world_size))
        # ranks advance in lockstep, so consumed * world_size samples of the global order are done
        self.consumed = min(consumed * old_ws // self.world_size, self.num_samples)
