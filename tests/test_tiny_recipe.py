"""The README's main job, end to end: scripts/tiny.sh in a fresh folder (slow, run in CI).

Prepares the shapes data, pretrains and finetunes the tiny recipe on CPU, evaluates on the
held-out shapes benchmark and answers one chat question; the finetuned model must answer
far above chance (about 35% for these question types).
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
CHANCE = 0.35
MIN_ACCURACY = 0.55


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
    accuracy = scores["accuracy"]
    print(f"tiny recipe: shapes accuracy {accuracy:.3f}", file=sys.stderr)
    assert accuracy >= MIN_ACCURACY > CHANCE
    answer = proc.stdout.strip().splitlines()[-1].strip()
    assert answer in {"1", "2", "3", "one", "two", "three"}, answer
