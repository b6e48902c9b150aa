"""A 2-process DDP stage on CPU (gloo), through the CLI as users start it.

Lightning starts the second process by re-running the command line, so both the `vrwkv`
console script and `python -m vrwkv_cli.main` are checked. VRWKV_TRACE_BATCHES=1 makes each
rank log the sample ids it trains on, to check the shards.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
STEPS, MICRO_BATCH, SEED = 3, 2, 42


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from vrwkv_core.data.shapes import prepare_shapes

    return prepare_shapes(tmp_path_factory.mktemp("ddp") / "shapes", n_train=24, n_eval=0, seed=5)


def trained_ids(out: Path, rank: int) -> tuple[list[int], list[str]]:
    lines = (out / "ranks" / f"rank{rank}.txt").read_text().splitlines()
    rows = [line.split("\t") for line in lines]
    return [int(r[0]) for r in rows], [i for r in rows for i in r[2].split()]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["python -m", "console script"])
def test_two_process_ddp_shards_the_data_and_rank0_alone_writes(shapes, tmp_path, launch):
    from vrwkv_core.checkpoint import load_pretrained
    from vrwkv_core.data.dataset import ResumableSampler
    from vrwkv_core.train.data import split_indices

    if launch == "console script":
        script = shutil.which("vrwkv")
        if script is None:
            pytest.skip("the vrwkv console script is not installed")
        head = [script]
    else:
        head = [sys.executable, "-m", "vrwkv_cli.main"]
    out = tmp_path / "out"
    args = [
        f"data.root={shapes}", "data.val_fraction=0.25", "data.num_workers=0",
        "model.rwkv.n_layer=1", "model.rwkv.n_embd=64",
        f"pretrain.out_dir={out}", f"pretrain.max_steps={STEPS}", f"pretrain.micro_batch={MICRO_BATCH}",
        "pretrain.save_every_steps=2", "pretrain.val_every_steps=2", f"pretrain.seed={SEED}",
        "hardware.accelerator=cpu", "hardware.devices=2", "hardware.strategy=ddp", "hardware.precision=fp32",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), VRWKV_TRACE_BATCHES="1", HF_HUB_OFFLINE="1")
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([*head, "pretrain", str(RECIPE), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    # Each rank trains on its own shard: exactly the sampler's positions r, r+2, r+4...
    records = [json.loads(line)["id"] for line in (shapes / "pretrain.jsonl").read_text().splitlines() if line.strip()]
    train_idx, _ = split_indices(len(records), 0.25, SEED)
    shards = []
    for rank in (0, 1):
        steps, ids = trained_ids(out, rank)
        assert steps == list(range(1, STEPS + 1))
        order = ResumableSampler(len(train_idx), seed=SEED, rank=rank, world_size=2).indices()
        assert ids == [records[train_idx[i]] for i in order[: STEPS * MICRO_BATCH]]
        shards.append(set(ids))
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == STEPS * MICRO_BATCH

    # Outputs written once, by rank 0: no other file appears.
    names = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert names == {"config.yaml", "model.safetensors", "last.ckpt", "prev.ckpt", "checkpoints.json",
                     "metrics.csv", "loss.png", "ranks", "ranks/rank0.txt", "ranks/rank1.txt"}  # fmt: skip
    assert done.stderr.count("pretrain done") == 1 and done.stderr.count(f"pretrain: {STEPS} steps in") == 1
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r["train_loss"]] == list(range(1, STEPS + 1))
    assert any(r["val_loss"] for r in rows)
    model, recipe = load_pretrained(out)
    assert recipe.model.rwkv.n_layer == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS and len(ckpt["callbacks"]["StageMonitor"]["rng"]) == 2, "one RNG state per rank"
