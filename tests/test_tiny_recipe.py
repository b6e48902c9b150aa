"""The README's main job, end to end: scripts/tiny.sh in a fresh folder (slow, run in CI).

Prepares the shapes data, pretrains and finetunes the tiny recipe on CPU, evaluates on the
held-out shapes benchmark and answers one chat question; the finetuned model must answer
at least 85% of every question category (chance is about 35%) and count the chat image's
shapes right.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("color", "count", "presence", "choice")
MIN_ACCURACY = 0.85
# eval_00000.png of the default shapes set: a red circle, a blue triangle and a yellow square
CHAT_ANSWERS = {"3", "three"}


@pytest.mark.slow
def test_main_job_learns_the_shapes(tmp_path):
    if shutil.which("vrwkv") is None:
        pytest.skip("the vrwkv console script is not installed (pip install -e .)")
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "tiny.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("pretrain", "finetune"):
        for name in ("config.yaml", "model.safetensors", "last.ckpt", "metrics.csv", "loss.png"):
            assert (tmp_path / "out" / "tiny" / stage / name).is_file(), f"{stage}/{name}"
    scores = json.loads((tmp_path / "out" / "tiny" / "eval" / "scores.json").read_text())
    per_category = {cat: scores[cat]["accuracy"] for cat in CATEGORIES}
    print(f"tiny recipe: shapes accuracy {scores['accuracy']:.3f}, per category {per_category}", file=sys.stderr)
    assert all(acc >= MIN_ACCURACY for acc in per_category.values()), per_category
    answer = proc.stdout.strip().splitlines()[-1].strip()
    assert answer.lower().rstrip(".") in CHAT_ANSWERS, answer
