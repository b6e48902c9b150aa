"""Grounded tower pretraining: region parsing, grid masks, the tower learns kinds, only the tower moves."""

from __future__ import annotations

import json

import pytest
import torch

from vrwkv_core.config import load_recipe
from vrwkv_core.checkpoint.build import build_from_parts
from vrwkv_core.data.dataset import VisionLanguageDataset
from vrwkv_core.data.shapes import prepare_shapes
from vrwkv_core.errors import DataError, RecipeError
from vrwkv_core.progress import NULL_PROGRESS, Progress
from vrwkv_core.tokenizer import default_tokenizer
from vrwkv_core.train.data import split_indices
from vrwkv_core.train.tower import cell_mask, parse_regions, pretrain_tower

from helpers import REPO


def test_cell_mask_marks_the_cells_a_box_overlaps():
    m = cell_mask((5, 2, 30, 27), 64, 64, 8).view(8, 8)
    assert m[:4, :4].all() and m.sum() == 16  # 8-px cells 0..3 in both directions
    m = cell_mask((33, 40, 41, 48), 64, 64, 8).view(8, 8)
    assert m.nonzero().tolist() == [[5, 4], [5, 5]]  # x 33..41 touches cells 4 and 5; y 40..48 is row 5 only
    m = cell_mask((0, 0, 100, 50), 200, 100, 2).view(2, 2)  # a 200x100 image squashed to 2x2 cells
    assert m.tolist() == [[1, 0], [0, 0]]


@pytest.mark.parametrize("value, says", [
    ({"box": [0, 0, 1, 1]}, "not a list"),
    ([{"box": [0, 0, 1], "phrase": "x"}], "regions[0].box is not four numbers"),
    ([{"box": [0, 0, 1, True], "phrase": "x"}], "regions[0].box is not four numbers"),
    ([{"box": [0, 0, 1, float("nan")], "phrase": "x"}], "regions[0].box is not four numbers"),
    ([{"box": [0, 0, 1, 1], "phrase": "a"}, {"box": [5, 0, 2, 1], "phrase": "b"}], "regions[1].box [5, 0, 2, 1] is empty"),
    ([{"box": [0, 0, 1, 1], "phrase": "  "}], "regions[0].phrase is not a non-empty string"),
    (["box"], "regions[0].box is not four numbers"),
])
def test_bad_regions_are_one_line_errors_naming_the_record(value, says):
    with pytest.raises(DataError) as err:
        parse_regions(value, "data.jsonl: record 3")
    assert str(err.value).startswith("data.jsonl: record 3: ") and says in str(err.value)
    assert "\n" not in str(err.value)


def test_regions_parse_to_boxes_and_lower_case_words():
    (r,) = parse_regions([{"box": [1, 2, 3.5, 4], "phrase": "Blue  circle"}], "x")
    assert r.box == (1.0, 2.0, 3.5, 4.0) and r.words == ("blue", "circle")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = prepare_shapes(tmp_path_factory.mktemp("shapes") / "shapes", n_train=200, n_eval=0, seed=3)
    return root


def _model_and_data(root, stem: str = "conv"):
    recipe = load_recipe(REPO / "recipes/tiny.yaml", [f"model.vision.tiny.stem={stem}"])
    torch.manual_seed(0)
    model = build_from_parts(recipe).float().train()
    ds = VisionLanguageDataset(root / "pretrain.jsonl", root / "images", default_tokenizer(), model.image_processor,
                               model.tokens_per_image, 128)  # fmt: skip
    return model, ds


def test_the_tower_learns_the_region_words_and_nothing_else_moves(shapes):
    model, ds = _model_and_data(shapes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 200 steps: the recipe's 4x4 pooled grid mixes background into each cell (120 were enough at 8x8)
    stats = pretrain_tower(model, ds, range(len(ds)), steps=200, lr=1e-3, batch=16, seed=0, progress=NULL_PROGRESS)
    # 3 kinds + 4 colours: ln(7) = 1.95 per word at the start; two words a phrase: ln(2) = 0.69 at best
    assert stats["words"] == 7 and 1.6 < stats["first_loss"] < 2.3 and stats["last_loss"] < 0.85
    assert stats["accuracy"] >= 0.9
    after = model.state_dict()
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"vit"}


def test_same_seed_same_tower(shapes):
    towers = []
    for _ in range(2):
        model, ds = _model_and_data(shapes)
        pretrain_tower(model, ds, range(0, 100), steps=5, lr=1e-3, batch=8, seed=7, progress=NULL_PROGRESS)
        towers.append(model.vit.state_dict())
    assert all(torch.equal(towers[0][k], towers[1][k]) for k in towers[0])


def test_records_without_regions_are_a_recipe_error(tmp_path, shapes):
    lines = [json.loads(x) for x in (shapes / "pretrain.jsonl").read_text().splitlines()[:5]]
    for r in lines:
        del r["regions"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    model, _ = _model_and_data(shapes)
    ds = VisionLanguageDataset(tmp_path / "p.jsonl", shapes / "images", default_tokenizer(), model.image_processor,
                               model.tokens_per_image, 128)  # fmt: skip
    with pytest.raises(RecipeError, match="no record of .*p.jsonl has 'regions'"):
        pretrain_tower(model, ds, range(len(ds)), steps=2, lr=1e-3, batch=2, seed=0, progress=NULL_PROGRESS)


def test_a_bad_region_names_the_file_and_record(tmp_path, shapes):
    lines = [json.loads(x) for x in (shapes / "pretrain.jsonl").read_text().splitlines()[:3]]
    lines[1]["regions"][0]["box"] = [10, 10, 5, 20]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    model, _ = _model_and_data(shapes)
    ds = VisionLanguageDataset(tmp_path / "p.jsonl", shapes / "images", default_tokenizer(), model.image_processor,
                               model.tokens_per_image, 128)  # fmt: skip
    with pytest.raises(DataError, match=r"p.jsonl: record 2 \(shapes-train-00001\): regions\[0\].box"):
        pretrain_tower(model, ds, range(len(ds)), steps=2, lr=1e-3, batch=2, seed=0, progress=NULL_PROGRESS)


class _Log(Progress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_stage_one_pretrains_the_tower_first_and_a_resume_skips_it(tmp_path):
    from vrwkv_core.checkpoint.tensors import read_safetensors
    from vrwkv_core.train.runner import run_stage

    data = prepare_shapes(tmp_path / "shapes", n_train=20, n_eval=0, seed=3)
    base = [f"data.root={data}", "data.val_fraction=0.2", "data.num_workers=0", "model.rwkv.n_layer=1",
            "model.rwkv.n_embd=64", f"pretrain.out_dir={tmp_path / 'a'}", "pretrain.micro_batch=4",
            "pretrain.save_every_steps=2", "pretrain.tower_steps=3"]  # fmt: skip
    log = _Log()
    run_stage(load_recipe(REPO / "recipes/tiny.yaml", base + ["pretrain.max_steps=2"]), "pretrain", progress=log)
    (line,) = [x for x in log.lines if "tower pretrained" in x]
    records = [json.loads(x) for x in (data / "pretrain.jsonl").read_text().splitlines()]
    train_idx, _ = split_indices(len(records), 0.2, 42)
    n = sum(len(records[i]["regions"]) for i in train_idx)  # the 16 training records' shapes only
    assert n < sum(len(r["regions"]) for r in records)
    assert line.startswith(f"pretrain: tower pretrained, 3 steps on {n} regions: loss ")
    trained = read_safetensors(tmp_path / "a" / "model.safetensors")
    log = _Log()
    run_stage(load_recipe(REPO / "recipes/tiny.yaml", base + ["pretrain.max_steps=4"]), "pretrain", resume=True,
              progress=log)  # fmt: skip
    assert not [x for x in log.lines if "tower pretrained" in x]  # the checkpoint holds the trained tower
    resumed = read_safetensors(tmp_path / "a" / "model.safetensors")
    vit = [k for k in trained if k.startswith("vit.")]
    assert vit and all(torch.equal(trained[k], resumed[k]) for k in vit)  # frozen in the stage itself
    assert not all(torch.equal(trained[k], resumed[k]) for k in trained if k.startswith("rwkv."))
