"""Synthetic shapes: deterministic, valid LLaVA data, answers consistent with the pixels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from vrwkv_cli.prepare_data import app
from vrwkv_core.data.prepare import prepare_llava
import random

from vrwkv_core.data.shapes import (
    CATEGORIES,
    CHOICE_ORDERS,
    CHOICE_SUFFIX,
    COLORS,
    DRILLS_PER_IMAGE,
    SHAPES,
    Shape,
    caption,
    finetune_questions,
    prepare_shapes,
    redraw_if_stale,
)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path):
    a = tree_bytes(prepare_shapes(tmp_path / "a", n_train=24, n_eval=8, seed=5))
    b = tree_bytes(prepare_shapes(tmp_path / "b", n_train=24, n_eval=8, seed=5))
    c = tree_bytes(prepare_shapes(tmp_path / "c", n_train=24, n_eval=8, seed=6))
    assert a == b
    assert a["pretrain.jsonl"] != c["pretrain.jsonl"]
    assert len([k for k in a if k.startswith("images/")]) == 32
    assert not list(tmp_path.glob(".*"))  # the temp build folder was renamed into place


def test_layout_and_answers(tmp_path):
    root = prepare_shapes(tmp_path / "shapes", n_train=40, n_eval=16, seed=1)
    pretrain = [json.loads(x) for x in (root / "pretrain.jsonl").read_text().splitlines()]
    finetune = [json.loads(x) for x in (root / "finetune.jsonl").read_text().splitlines()]
    questions = [json.loads(x) for x in (root / "eval/questions.jsonl").read_text().splitlines()]
    answers = json.loads((root / "eval/answers.json").read_text())
    assert len(pretrain) == 40 and len(questions) == 16
    assert [r["image"][0] for r in pretrain] == list(dict.fromkeys(r["image"][0] for r in finetune if "image" in r))
    assert [q["category"] for q in questions[:4]] == list(CATEGORIES)
    assert set(answers) == {q["question_id"] for q in questions}
    assert not {q["image"] for q in questions} & {r["image"][0] for r in finetune if "image" in r}  # held-out images

    for rec in pretrain:
        img = np.asarray(Image.open(root / "images" / rec["image"][0]))
        assert img.shape == (64, 64, 3)
        caption = rec["conversations"][1]["value"]
        # every colour named in the caption is drawn, and no other
        drawn = {name for name, rgb in COLORS.items() if (img == rgb).all(-1).sum() > 50}
        assert drawn == set(re.findall(r" in (\w+)", caption))
        # each region's box holds every pixel of its shape's colour, and its phrase names the kind
        assert sorted(r["phrase"] for r in rec["regions"]) == sorted(
            f"{c} {k}" for k, c in re.findall(r"a (\w+) in (\w+)", caption))
        for region in rec["regions"]:
            x0, y0, x1, y1 = region["box"]
            ys, xs = np.nonzero((img == COLORS[region["phrase"].split()[0]]).all(-1))
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            assert 16 <= x1 - x0 <= 26 and x1 - x0 == y1 - y0

    for q in questions:
        ans = answers[q["question_id"]]
        assert all(len(a.split()) == 1 for a in ans)
        if q["category"] == "choice":
            assert q["text"].endswith(CHOICE_SUFFIX) and ans[0] in "ABC"
        if q["category"] == "count":
            assert ans[0] in "123"
        if q["category"] == "color":
            img = np.asarray(Image.open(root / "images" / q["image"]))
            assert (img == COLORS[ans[0]]).all(-1).sum() > 50


def test_records_pass_prepare_data(tmp_path):
    root = prepare_shapes(tmp_path / "shapes", n_train=30, n_eval=4, seed=2)
    for name in ("pretrain.jsonl", "finetune.jsonl"):
        report = prepare_llava(root / name, root / "images", tmp_path / name, max_reject_fraction=0.0)
        assert (report.accepted, report.rejected) == (len((root / name).read_text().splitlines()), 0)
    assert report.accepted > 30 * 6  # finetune: one record per question, 6-10 per image


def test_cli(tmp_path):
    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["synthetic-shapes", "--out", str(out), "--train", "6", "--eval", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert tree_bytes(out) == tree_bytes(prepare_shapes(tmp_path / "t", n_train=6, n_eval=2, seed=3))


def test_captions_name_kinds_first_in_kind_order():
    scene = [Shape("triangle", "red", 0), Shape("square", "yellow", 1), Shape("circle", "blue", 3)]
    assert caption(scene) == "a circle in blue, a square in yellow and a triangle in red."
    assert caption([Shape("square", "green", 2)]) == "a square in green."


def _choice_answer(q: str, letter: str) -> str:
    """The kind a lettered choice's answer names, checking the question's layout."""
    assert q.endswith(CHOICE_SUFFIX)
    options = dict(line.split(". ") for line in q.splitlines()[1:4])
    assert sorted(options.values()) == sorted(SHAPES)
    return options[letter]


def test_finetune_questions_ask_everything_about_the_scene():
    scene = [Shape("triangle", "red", 0), Shape("circle", "blue", 3)]
    pairs = finetune_questions(scene, random.Random(0))
    assert len(pairs) == 14  # per shape its colour, its kind in words and 3 lettered; the count; 3 presences
    asked = dict(pairs)
    assert asked["What color is the triangle?"] == "red" and asked["What color is the circle?"] == "blue"
    assert asked["Which shape is red?"] == "triangle" and asked["Which shape is blue?"] == "circle"
    assert asked["How many shapes are there?"] == "2"
    assert [asked[f"Is there a {k}?"] for k in ("circle", "square", "triangle")] == ["yes", "no", "yes"]
    choices = [(q, letter) for q, letter in pairs if "\n" in q]
    assert len(choices) == 2 * CHOICE_ORDERS
    for q, letter in choices:
        assert _choice_answer(q, letter) == {"red": "triangle", "blue": "circle"}[q.split()[3].rstrip("?")]


def test_finetune_records_ask_one_question_each_and_match_their_captions(tmp_path):
    root = prepare_shapes(tmp_path / "s", n_train=30, n_eval=2, seed=3)
    pretrain = [json.loads(x) for x in (root / "pretrain.jsonl").read_text().splitlines()]
    finetune = [json.loads(x) for x in (root / "finetune.jsonl").read_text().splitlines()]
    by_image: dict[str, list[tuple[str, str]]] = {}
    drills = [f for f in finetune if "image" not in f]
    for f in finetune[: len(finetune) - len(drills)]:
        human, gpt = f["conversations"]  # one question, one answer: no answer gives away another
        assert human["from"] == "human" and gpt["from"] == "gpt" and human["value"].startswith("<image>\n")
        asked = by_image.setdefault(f["image"][0], [])
        assert f["id"] == f"{f['image'][0].replace('train_', 'shapes-train-').removesuffix('.png')}-q{len(asked)}"
        asked.append((human["value"].removeprefix("<image>\n"), gpt["value"]))
    assert list(dict.fromkeys(by_image)) == [p["image"][0] for p in pretrain]
    for p in pretrain:
        colour_of = dict(re.findall(r"a (\w+) in (\w+)", p["conversations"][1]["value"]))
        pairs = by_image[p["image"][0]]
        asked = dict(pairs)
        assert len(pairs) == (2 + CHOICE_ORDERS) * len(colour_of) + 4
        assert asked["How many shapes are there?"] == str(len(colour_of))
        for kind, colour in colour_of.items():
            assert asked[f"What color is the {kind}?"] == colour and asked[f"Is there a {kind}?"] == "yes"
            assert asked[f"Which shape is {colour}?"] == kind
        for q, letter in pairs:
            if "\n" in q:
                assert _choice_answer(q, letter) == {c: k for k, c in colour_of.items()}[q.split()[3].rstrip("?")]
    # text-only option drills after the image records, the asked kind skewed toward the first
    assert [d["id"] for d in drills] == [f"shapes-drill-{i:05d}" for i in range(DRILLS_PER_IMAGE * 30)]
    assert finetune[-len(drills):] == drills
    kinds = []
    for d in drills:
        human, gpt = d["conversations"]
        kind = re.fullmatch(r"Which shape is the (\w+)\?", human["value"].splitlines()[0])[1]
        assert _choice_answer(human["value"], gpt["value"]) == kind
        kinds.append(kind)
    assert kinds.count("circle") > kinds.count("square") > kinds.count("triangle") > 0


def test_an_older_folder_is_drawn_again_with_the_same_images(tmp_path):
    root = prepare_shapes(tmp_path / "s", n_train=5, n_eval=2, seed=4)
    before = tree_bytes(root)
    assert not redraw_if_stale(root)  # current: left alone
    meta = json.loads((root / "shapes.json").read_text())
    del meta["captions"]  # as written before kind-first captions
    (root / "shapes.json").write_text(json.dumps(meta))
    (root / "pretrain.jsonl").write_text("old\n")
    assert redraw_if_stale(root)
    assert tree_bytes(root) == before
    (tmp_path / "other").mkdir()
    assert not redraw_if_stale(tmp_path / "other")  # not a shapes folder
