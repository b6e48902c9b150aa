"""Shared image prefixes in training: one prefix run, branched states, the same hidden states."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import REPO, build_tiny_vlm
from PIL import Image

from vrwkv_core.config import load_recipe
from vrwkv_core.data.dataset import ResumableSampler, VisionLanguageDataset, collate
from vrwkv_core.errors import RecipeError
from vrwkv_core.model.visual_rwkv import VisualRWKV
from vrwkv_core.train.branching import branched_hidden, length_buckets, prefix_lengths
from vrwkv_core.train.module import StageModule, sequence_loss


def _padded(lengths: list[int], groups: list[list[int]]) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


@pytest.mark.parametrize("seed", range(6))
def test_length_buckets_are_the_least_padded_split(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 14))]
    for k in (1, 2, 3, 4):
        groups = length_buckets(lengths, k)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert len(groups) <= k and all(groups)
        # brute force: every split of the sorted distinct lengths into <= k contiguous runs
        distinct = sorted(set(lengths))
        best = min(
            sum(sum(1 for n in lengths if lo <= n <= hi) * hi for lo, hi in zip([0] + [distinct[c] + 1 for c in cuts],
                                                                                [distinct[c] for c in cuts] + [distinct[-1]]))
            for m in range(min(k, len(distinct)))
            for cuts in itertools.combinations(range(len(distinct) - 1), m)
        )  # fmt: skip
        assert _padded(lengths, groups) == best


def _records(tmp_path: Path) -> Path:
    """Questions about 3 images (2 to 4 each, different lengths), two text-only records and a
    two-image record, shuffled."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    rng = random.Random(0)
    words = "what colour is the shape in this picture tell me please how many are there".split()
    records = []
    for i, n in enumerate([4, 2, 3]):
        for j in range(n):
            question = " ".join(rng.choices(words, k=rng.randint(1, 9)))
            records.append({"id": f"{i}-{j}", "image": f"{i}.png",
                            "conversations": [{"from": "human", "value": "<image>\n" + question},
                                              {"from": "gpt", "value": rng.choice(["yes", "no", "two"])}]})  # fmt: skip
    for j in range(2):
        records.append({"id": f"t{j}", "conversations": [{"from": "human", "value": " ".join(words[j:j + 5])},
                                                          {"from": "gpt", "value": "fine"}]})  # fmt: skip
    records.append({"id": "two", "image": ["0.png", "1.png"],
                    "conversations": [{"from": "human", "value": "<image>\n<image>\nsame colour?"}, {"from": "gpt", "value": "no"}]})  # fmt: skip
    rng.shuffle(records)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("learned_state", [False, True])
def test_branched_forward_gives_the_plain_hidden_states_and_gradients(tmp_path: Path, tokenizer, learned_state: bool) -> None:
    torch.manual_seed(0)
    model = build_tiny_vlm(seed=3).train()
    if learned_state:  # state tuning: records without an image start from it in both forwards
        with torch.no_grad():
            model.rwkv.enable_state_tuning().normal_(0, 0.5)
    ds = VisionLanguageDataset(_records(tmp_path), tmp_path / "images", tokenizer, model.image_processor, 4, 128)
    assert sorted(ds.image_keys).count(-1) == 2 and len(set(ds.image_keys)) == 5  # 3 images, 1 pair, none
    batch = collate([ds[i] for i in range(len(ds))])
    plen = prefix_lengths(batch["input_ids"])
    shared = {(k, p) for k, p in zip(batch["image_keys"].tolist(), plen) if p}
    assert len(shared) == 4 < len(ds) - 2  # the prefixes really are shared, so branching has work to skip

    outs = {}
    for branched in (False, True):
        model.zero_grad()
        if branched:
            hidden = branched_hidden(model, batch)
        else:
            hidden, _ = model(batch["input_ids"], batch["images"], batch["image_counts"], logits="hidden")
        loss, _ = sequence_loss(hidden, batch["labels"], model.rwkv.head)
        loss.backward()
        outs[branched] = (hidden.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (h0, l0, g0), (h1, l1, g1) = outs[False], outs[True]
    inside = torch.arange(h0.shape[1])[None] < batch["lengths"][:, None]
    assert torch.allclose(h1[inside], h0[inside], atol=1e-5, rtol=1e-4)
    assert not h1[~inside].any()  # padding is zeros
    assert torch.allclose(l1, l0, atol=1e-6, rtol=1e-5)
    assert g1.keys() == g0.keys() and any(n.startswith("proj.") for n in g0)  # images' gradients too
    assert ("rwkv.state_wkv" in g0) == learned_state
    for name in g0:
        assert torch.allclose(g1[name], g0[name], atol=1e-5, rtol=1e-3), name


def test_sampler_groups_records_of_one_image_in_runs(tmp_path: Path) -> None:
    rng = random.Random(1)
    keys = [rng.choice([-1, 0, 1, 2, 3]) for _ in range(60)]
    sampler = ResumableSampler(len(keys), seed=5, group_keys=keys, group_size=3)
    order = list(sampler)
    assert sorted(order) == list(range(60))
    assert order != list(ResumableSampler(len(keys), seed=5))  # regrouped
    # each key's records come in runs of 3 and one shorter run (adjacent runs of a key merge)
    for key in set(keys) - {-1}:
        segments = [len(list(g)) for k, g in itertools.groupby(order, key=lambda i: keys[i]) if k == key]
        assert sum(n % 3 for n in segments) == keys.count(key) % 3
    assert max(len(list(g)) for k, g in itertools.groupby(order, key=lambda i: keys[i]) if k >= 0) >= 3
    # the order is a function of (seed, epoch) and resumes where it stopped
    again = ResumableSampler(len(keys), seed=5, group_keys=keys, group_size=3)
    it = iter(again)
    head = [next(it) for _ in range(17)]
    resumed = ResumableSampler(len(keys), seed=5, group_keys=keys, group_size=3)
    resumed.load_state_dict(again.state_dict())
    assert head + list(resumed) == order
    other = ResumableSampler(len(keys), seed=5, group_keys=keys, group_size=3)
    other.set_epoch(1)
    assert list(other) != order


def test_shared_prefix_is_off_where_every_padded_position_counts(tiny_recipe) -> None:
    recipe = REPO / "recipes" / "tiny.yaml"
    model = VisualRWKV(tiny_recipe.model)
    assert StageModule(model, load_recipe(recipe, ["finetune.shared_prefix=8"]), "finetune").branched
    assert not StageModule(model, load_recipe(recipe, ["finetune.shared_prefix=0"]), "finetune").branched
    l2wrap = load_recipe(recipe, ["finetune.shared_prefix=8", "finetune.l2wrap=1e-4"])
    assert not StageModule(model, l2wrap, "finetune").branched  # l2wrap needs every padded position
    with pytest.raises(RecipeError, match="pretrain.shared_prefix"):
        load_recipe(recipe, ["pretrain.shared_prefix=-1"])
