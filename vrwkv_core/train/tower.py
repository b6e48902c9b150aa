"""Grounded tower pretraining: a tower trained from scratch first learns from region labels.

Real recipes take towers that were pretrained elsewhere (SigLIP, DINOv2) and keep them frozen.
A random tower (the tiny recipe's) has to learn to see inside the recipe, and captions through a
from-scratch LM teach it little: the shapes' kind words are mostly predictable from the count
and the captions' order, so after 150 caption steps a linear probe finds shape kinds at chance,
and the LM's gradient, which moves the tower at the LM's learning rate, erases what a tower
pretrained on kinds knew (stage-1 caption loss 0.15 against 0.011 with that tower frozen;
issue 28). So, when `<stage>.tower_steps` > 0, stage 1 begins by training the tower alone on the
records' region labels, as detection and grounding data teach towers:

    "regions": [{"box": [x0, y0, x1, y1], "phrase": "blue circle"}, ...]   (pixels of the image)

The tower's feature grid (the one the projector reads) is averaged over the cells a box
covers, and a linear head, dropped afterwards, names each word of the phrase (softmax over
the words of every phrase in the file). It takes seconds: no LM runs. A resumed stage skips
it (its checkpoint holds the trained tower).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from vrwkv_core.data.dataset import record_images, stack_images
from vrwkv_core.errors import DataError, RecipeError
from vrwkv_core.progress import Progress

if TYPE_CHECKING:
    from vrwkv_core.data.dataset import VisionLanguageDataset
    from vrwkv_core.model.visual_rwkv import VisualRWKV


@dataclass(frozen=True)
class Region:
    """One labelled box of a record's image: pixel box (x1, y1 exclusive) and phrase words."""

    box: tuple[float, float, float, float]
    words: tuple[str, ...]


def parse_regions(value: Any, where: str) -> list[Region]:
    """A record's "regions" list, checked; `where` names the file and line in errors."""
    if not isinstance(value, list):
        raise DataError(f"{where}: 'regions' is not a list")
    out = []
    for i, item in enumerate(value):
        box = item.get("box") if isinstance(item, dict) else None
        phrase = item.get("phrase") if isinstance(item, dict) else None
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise DataError(f"{where}: regions[{i}].box is not four numbers [x0, y0, x1, y1]")
        if not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
            raise DataError(f"{where}: regions[{i}].box {box} is empty or negative (x0 < x1 and y0 < y1)")
        if not isinstance(phrase, str) or not phrase.split():
            raise DataError(f"{where}: regions[{i}].phrase is not a non-empty string")
        out.append(Region(tuple(float(v) for v in box), tuple(phrase.lower().split())))  # type: ignore[arg-type]
    return out


def cell_mask(box: tuple[float, float, float, float], width: int, height: int, side: int) -> torch.Tensor:
    """[side*side] row-major: 1 where a grid cell overlaps the box (the image resized to a square
    grid of side x side cells, as the image processor squashes it)."""
    x0, y0, x1, y1 = box
    cols = torch.arange(side, dtype=torch.float64)
    cw, ch = width / side, height / side
    in_x = (cols * cw < x1) & ((cols + 1) * cw > x0)
    in_y = (cols * ch < y1) & ((cols + 1) * ch > y0)
    return (in_y[:, None] & in_x[None, :]).flatten().float()


@dataclass
class _Item:
    index: int  # record index in the dataset
    image: str  # its image, relative to the image folder
    masks: torch.Tensor  # [R, side*side]
    words: list[list[int]]  # word ids per region


def _collect(dataset: "VisionLanguageDataset", indices: Sequence[int], side: int) -> tuple[list[_Item], list[str]]:
    """Every record of `indices` with regions (one image each): masks over the grid, word ids."""
    found: list[tuple[int, str, list[Region], tuple[int, int]]] = []
    vocab: set[str] = set()
    for index in indices:
        record = dataset.read_record(index)
        if "regions" not in record:
            continue
        where = f"{dataset.records_path}: record {index + 1} ({record.get('id', 'no id')})"
        regions = parse_regions(record["regions"], where)
        images = record_images(record)
        if len(images) != 1:
            raise DataError(f"{where}: regions need exactly one image per record (found {len(images)})")
        if not regions:
            continue
        path = dataset.image_folder / images[0]  # inside the folder: the dataset rejects other paths
        try:
            with Image.open(path) as im:
                size = im.size
        except OSError as err:
            raise DataError(f"{path}: cannot read the image ({err})") from None
        found.append((index, images[0], regions, size))
        vocab.update(w for r in regions for w in r.words)
    words = sorted(vocab)
    ids = {w: i for i, w in enumerate(words)}
    items = [_Item(index, image, torch.stack([cell_mask(r.box, w, h, side) for r in regions]),
                   [[ids[x] for x in r.words] for r in regions]) for index, image, regions, (w, h) in found]
    return items, words


def pretrain_tower(model: "VisualRWKV", dataset: "VisionLanguageDataset", indices: Sequence[int], steps: int,
                   lr: float, batch: int, seed: int, progress: Progress) -> dict[str, float]:
    """Trains `model.vit` alone for `steps` AdamW steps on the region labels of the records
    `indices` (the training split) of `dataset`.

    Returns {"first_loss", "last_loss", "accuracy" (the last batch's regions whose top-k words are
    their k phrase words), "regions", "words"}. With k words to a phrase the loss cannot go below
    ln k (the head spreads over them). Raises RecipeError when no record has regions.
    """
    side = int(math.isqrt(model.tokens_per_image))
    if side * side != model.tokens_per_image:
        raise RecipeError(f"tower_steps: model.tokens_per_image {model.tokens_per_image} is not a square grid")
    items, words = _collect(dataset, indices, side)
    if not items:
        raise RecipeError(f"tower_steps: no record of {dataset.records_path} has 'regions' to pretrain the tower on",
                          hint="set tower_steps: 0, or add regions [{box, phrase}] to the records")
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(model.vit.embed_dim, len(words))
    with torch.no_grad():  # a seeded init, independent of the global RNG's state
        bound = 1 / math.sqrt(model.vit.embed_dim)
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.uniform_(-bound, bound, generator=gen)
    head = head.to(model.device)
    model.vit.freeze(False)
    threads = torch.get_num_threads()
    if model.device.type == "cpu":
        # hundreds of small ops a step: on a busy 2-core machine each waits for a descheduled
        # sibling thread (30 steps: 119 s on two threads, 3.4 s on one)
        torch.set_num_threads(1)
    try:
        return {**_train(model, dataset, items, head, steps, lr, batch, seed, progress), "words": float(len(words))}
    finally:
        torch.set_num_threads(threads)


def _train(model: "VisualRWKV", dataset: "VisionLanguageDataset", items: list[_Item], head: torch.nn.Linear,
           steps: int, lr: float, batch: int, seed: int, progress: Progress) -> dict[str, float]:
    params = list(model.vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    first = last = accuracy = float("nan")
    progress.start("tower pretraining on region labels", total=steps)
    for step in range(steps):
        picked = order.sample(items, min(batch, len(items)))
        images = stack_images([dataset.load_image(it.image, it.index) for it in picked])
        feats = model.vit(images).float()  # [N, side*side, D]
        rows, targets = [], []
        for n, it in enumerate(picked):
            masks = it.masks.to(feats.device)
            pooled = masks @ feats[n] / masks.sum(1, keepdim=True)  # [R, D]
            for r, word_ids in enumerate(it.words):
                rows += [pooled[r]] * len(word_ids)
                targets += word_ids
        logits = head(torch.stack(rows))
        loss = F.cross_entropy(logits, torch.tensor(targets, device=feats.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if step == 0 else first
        if step == steps - 1:  # the last batch: regions whose top-k words are exactly their k phrase words
            hits, at = 0, 0
            for it in picked:
                for word_ids in it.words:
                    top = logits[at].topk(len(word_ids)).indices.tolist()
                    hits += set(top) == set(word_ids)
                    at += len(word_ids)
            accuracy = hits / max(1, sum(len(it.words) for it in picked))
        progress.update(1)
    progress.close()
    return {"first_loss": first, "last_loss": last, "accuracy": accuracy,
            "regions": float(sum(len(it.words) for it in items))}
