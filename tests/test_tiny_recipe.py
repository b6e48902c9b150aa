"""The README's main job, end to end: scripts/tiny.sh in a fresh folder (slow, run in CI).

Prepares the shapes data, pretrains and finetunes the tiny recipe on CPU, evaluates on the
held-out shapes benchmark and answers one chat question. The finetuned model must answer
far above chance overall (about 35% for these question types), solve colour, counting and
presence, choose the lettered option well above chance and give the image's shape count in
chat, and stage 1's tower pretraining must name the shapes' kinds and colours (its last batch's
region words). Choice is asserted at a lower bar than the others: it ends at 60-78% across
seeds (issue 28: the aim is 85% in every category).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vrwkv_core.data.shapes import COLORS, NUMBER_WORDS

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("color", "count", "presence", "choice")
CHANCE = 0.35
MIN_ACCURACY = 0.85
MIN_SOLVED_ACCURACY = 0.85  # colour, count and presence (96-100% at seeds 42, 1, 2)
MIN_CHOICE_ACCURACY = 0.5  # lettered choice, chance 1/3 (60-78% at seeds 42, 1, 2)


@pytest.mark.slow
def test_main_job_learns_the_shapes(tmp_path):
    if shutil.which("vrwkv") is None:
        pytest.skip("the vrwkv console script is not installed (pip install -e .)")
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "tiny.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # "pretrain: tower pretrained, 300 steps on N regions: loss a -> b, words right 100%, 9 s" (may wrap)
    right = re.search(r"tower pretrained.*?words\s+right\s+(\d+)%", " ".join((proc.stdout + proc.stderr).split()))
    assert right and int(right.group(1)) >= 90, (proc.stdout + proc.stderr)[-3000:]
    for stage in ("pretrain", "finetune"):
        for name in ("config.yaml", "model.safetensors", "last.ckpt", "metrics.csv", "loss.png"):
            assert (tmp_path / "out" / "tiny" / stage / name).is_file(), f"{stage}/{name}"
    scores = json.loads((tmp_path / "out" / "tiny" / "eval" / "scores.json").read_text())
    per_category = {cat: scores["categories"][cat]["accuracy"] for cat in CATEGORIES}
    print(f"tiny recipe: shapes accuracy {scores['accuracy']:.3f}, per category {per_category}", file=sys.stderr)
    assert sum(scores["categories"][cat]["count"] for cat in CATEGORIES) == scores["count"]
    assert scores["accuracy"] >= MIN_ACCURACY > CHANCE
    assert min(per_category[c] for c in ("color", "count", "presence")) >= MIN_SOLVED_ACCURACY, per_category
    assert per_category["choice"] >= MIN_CHOICE_ACCURACY, per_category
    # the chat question is "How many shapes are there?" about eval_00000.png: count its colours
    img = np.asarray(Image.open(tmp_path / "data" / "shapes" / "images" / "eval_00000.png").convert("RGB"))
    shapes = sum(int((img == rgb).all(-1).sum() > 50) for rgb in COLORS.values())
    answer = proc.stdout.strip().splitlines()[-1].strip()
    assert answer in {str(shapes), NUMBER_WORDS[shapes]}, (answer, shapes)
