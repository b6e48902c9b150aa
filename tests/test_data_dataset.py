"""VisionLanguageDataset, collate (mixed image counts) and the resumable sharded sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vrwkv_core.data import ResumableSampler, VisionLanguageDataset, collate
from vrwkv_core.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, encode_conversation
from vrwkv_core.errors import DataError

TPI = 4


def processor(img: Image.Image) -> dict[str, torch.Tensor]:
    """A stand-in for the model's processor: two 'towers' at different sizes."""
    big = torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).float() / 255
    return {"a": big, "b": big[:, ::2, ::2].contiguous()}


@pytest.fixture(scope="module")
def tok():
    from vrwkv_core.tokenizer import RWKVTokenizer

    return RWKVTokenizer()


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    images = tmp_path / "images"
    images.mkdir()
    for name, color in [("r.png", (255, 0, 0)), ("g.png", (0, 255, 0)), ("b.png", (0, 0, 255))]:
        Image.new("RGB", (16, 16), color).save(images / name)
    (images / "bad.png").write_text("not a png")
    qa = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "one", "image": "r.png", "conversations": qa},
        {"id": "none", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there, friend."}]},
        {"id": "two", "image": ["g.png", "b.png"], "conversations": [{"from": "human", "value": "<image>\n<image>\nBoth?"}, {"from": "gpt", "value": "green, blue"}]},
        {"id": "bad", "image": ["bad.png"], "conversations": qa},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, images, records


def test_items_and_collate_mixed_counts(data, tok):
    path, images, records = data
    ds = VisionLanguageDataset(path, images, tok, processor, TPI, ctx_len=256)
    assert len(ds) == 4
    item = ds[2]
    ids, labels = encode_conversation(records[2]["conversations"], tok, TPI)
    assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
    assert len(item["images"]) == 2

    batch = collate([ds[0], ds[1], ds[2]])
    lens = [len(encode_conversation(records[i]["conversations"], tok, TPI)[0]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lens))
    assert batch["image_counts"].tolist() == [1, 0, 2]
    assert batch["images"]["a"].shape == (3, 3, 8, 8) and batch["images"]["b"].shape == (3, 3, 4, 4)
    # images are stacked in sample order: red, then green and blue
    assert batch["images"]["a"][:, :, 0, 0].argmax(1).tolist() == [0, 1, 2]
    for i, n in enumerate(lens):
        assert (batch["input_ids"][i, n:] == 0).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i] == IMAGE_TOKEN_ID).sum() == TPI * batch["image_counts"][i]
    assert batch["n_skipped"] == 0 and batch["ids"] == ["one", "none", "two"]
    # text-only batch: no images at all
    only_text = collate([ds[1]])
    assert only_text["images"] is None and only_text["image_counts"].tolist() == [0]


def test_tensor_processor_is_stacked(data, tok):
    path, images, _ = data
    ds = VisionLanguageDataset(path, images, tok, lambda im: processor(im)["a"], TPI, ctx_len=256)
    assert collate([ds[2], ds[0]])["images"].shape == (3, 3, 8, 8)


def test_an_images_run_of_records_decodes_it_once(data, tok):
    path, images, _ = data
    calls = []
    ds = VisionLanguageDataset(path, images, tok, lambda im: calls.append(1) or processor(im), TPI, ctx_len=256)
    first, again = ds[0], ds[0]  # shared_prefix batches an image's records one after another
    assert len(calls) == 1 and torch.equal(first["images"][0]["a"], again["images"][0]["a"])
    ds[2]
    assert len(calls) == 3  # green and blue
    Image.new("RGB", (16, 16), (0, 0, 0)).save(images / "r.png")  # another image at the path
    ds[2], ds[0]
    assert len(calls) == 6 and ds[0]["images"][0]["a"].max() == 0  # only the last one is kept


def test_bad_image_raises_or_is_skipped(data, tok):
    path, images, _ = data
    ds = VisionLanguageDataset(path, images, tok, processor, TPI, ctx_len=256)
    with pytest.raises(DataError, match=r"bad\.png"):
        ds[3]
    ds = VisionLanguageDataset(path, images, tok, processor, TPI, ctx_len=256, skip_bad_images=True)
    assert ds[3] is None and ds.n_skipped == 1
    batch = collate([ds[0], ds[3]])
    assert batch["n_skipped"] == 1 and batch["input_ids"].shape[0] == 1 and batch["image_counts"].tolist() == [1]
    assert collate([ds[3]]) is None
    # through a DataLoader with a worker process, the count travels with the batch
    loader = DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=1)
    (batch,) = list(loader)
    assert batch["n_skipped"] == 1 and batch["ids"] == ["one", "none", "two"]


def test_truncation_drops_whole_images(data, tok):
    path, images, records = data
    ids, _ = encode_conversation(records[2]["conversations"], tok, TPI)
    second = [i for i, x in enumerate(ids) if x == IMAGE_TOKEN_ID][TPI]
    ds = VisionLanguageDataset(path, images, tok, processor, TPI, ctx_len=second + 1)
    item = ds[2]
    assert len(item["input_ids"]) == second and len(item["images"]) == 1 and item["truncated"]
    assert collate([item])["n_truncated"] == 1


def test_sampler_shards_are_disjoint_and_seeded():
    n, ws = 23, 4
    shards = [list(ResumableSampler(n, seed=7, rank=r, world_size=ws)) for r in range(ws)]
    assert {len(s) for s in shards} == {6}  # ceil(23/4), padded by wrapping
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n)) and len(flat) == n + 1  # every sample, plus one wrapped pad
    dl = [list(ResumableSampler(n, seed=7, rank=r, world_size=ws, drop_last=True)) for r in range(ws)]
    assert {len(s) for s in dl} == {5} and len({i for s in dl for i in s}) == 20
    a, b = ResumableSampler(n, seed=7), ResumableSampler(n, seed=7)
    assert list(a) == list(b) and sorted(a.indices()) == list(range(n))
    b.set_epoch(1)
    assert list(b) != a.indices() and sorted(b.indices()) == list(range(n))
    assert list(ResumableSampler(n, seed=8)) != a.indices()
    assert list(ResumableSampler(n, seed=7, shuffle=False)) == list(range(n))


def test_sampler_resume_continues_at_the_next_sample():
    full = ResumableSampler(50, seed=3, rank=1, world_size=2)
    full.set_epoch(2)
    order = list(full)
    s = ResumableSampler(50, seed=3, rank=1, world_size=2)
    s.set_epoch(2)
    it = iter(s)
    first = [next(it) for _ in range(9)]
    state = s.state_dict()
    resumed = ResumableSampler(50, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.set_epoch(2)  # Lightning calls this on resume; the position must survive
    assert first + list(resumed) == order
    resumed.set_epoch(3)
    assert len(list(resumed)) == 25
    with pytest.raises(DataError, match="seed"):
        ResumableSampler(50, seed=4).load_state_dict(state)


def test_sampler_resume_with_another_world_size():
    # 2 ranks x 6 samples done = 12 global samples; on 4 ranks each continues after 3
    state = {"epoch": 0, "consumed": 6, "seed": 1, "world_size": 2, "dataset_len": 40}
    global_order = ResumableSampler(40, seed=1).indices()
    for r in range(4):
        s = ResumableSampler(40, seed=1, rank=r, world_size=4)
        s.load_state_dict(state)
        assert list(s) == global_order[12 + r :: 4]
