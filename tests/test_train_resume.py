"""Training reliability: exact resume, kill -9 safety, SIGTERM, damaged checkpoints, bad steps.

The end-to-end tests run the real CLI as a subprocess on a 1-layer tiny model and kill it;
VRWKV_TRACE_BATCHES=1 makes every rank log (step, exact loss, sample ids) per micro batch,
which is what "identical loss sequence, no batch seen twice" is checked against.
"""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vrwkv_core.config import load_recipe
from vrwkv_core.errors import CheckpointError, RecipeError, VrwkvError
from vrwkv_core.train.checkpoints import (
    LAST,
    MANIFEST,
    PAUSE_ENV,
    PREV,
    CheckpointWriter,
    find_resumable,
    read_manifest,
    recipe_drift,
    sha256_of,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """20 records: 16 train (4 batches of 4, so an epoch ends at step 4) + 4 validation."""
    from vrwkv_core.data.shapes import prepare_shapes

    return prepare_shapes(tmp_path_factory.mktemp("resume") / "shapes", n_train=20, n_eval=0, seed=3)


def stage_args(data: Path, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "data.root": data, "data.val_fraction": 0.2, "data.num_workers": 0,
        "model.rwkv.n_layer": 1, "model.rwkv.n_embd": 64,
        "pretrain.out_dir": out, "pretrain.micro_batch": 4, "pretrain.warmup_steps": 2, "pretrain.max_steps": 6,
        "pretrain.save_every_steps": 3, "pretrain.val_every_steps": 3,
    }  # fmt: skip
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def cli(args: list[str], *flags: str) -> list[str]:
    return [sys.executable, "-m", "vrwkv_cli.main", "pretrain", str(RECIPE), *args, *flags]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), VRWKV_TRACE_BATCHES="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def trace(out: Path, rank: int = 0) -> list[tuple[int, str, str]]:
    """(step, exact loss, sample ids) per micro batch, in the order trained."""
    path = out / "ranks" / f"rank{rank}.txt"
    if not path.is_file():
        return []
    return [(int(s), loss, ids) for s, loss, ids in (line.split("\t") for line in path.read_text().splitlines())]


def landed(out: Path, step: int) -> bool:
    """The checkpoint of `step` is listed in the manifest and renamed into place."""
    entries = read_manifest(out) or []
    return any(e["step"] == step and e["file"] == LAST for e in entries) and not (out / f".{LAST}.tmp").exists()


def weights(out: Path) -> dict[str, torch.Tensor]:
    from vrwkv_core.checkpoint.tensors import read_safetensors

    return read_safetensors(out / "model.safetensors")


# -- end to end: the CLI killed and resumed ---------------------------------------------------


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_matches_the_unbroken_run(shapes, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = subprocess.run(cli(stage_args(shapes, ref)), cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(cli(stage_args(shapes, run)), cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: landed(run, 3), proc, "the step-3 checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists(), "killed before the end"
    before = trace(run)

    # A harmless change (the name) is reported as drift, and the run goes on.
    resumed = subprocess.run(cli(stage_args(shapes, run), "name=tiny-resumed", "--resume"), cwd=tmp_path,
                             env=cli_env(), capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the recipe differs from the checkpoint's" in resumed.stderr and "name: 'tiny' -> 'tiny-resumed'" in resumed.stderr
    assert "resumed at step 3" in resumed.stderr
    after = trace(run)[len(before):]

    expected = trace(ref)
    assert [t[0] for t in expected] == [1, 2, 3, 4, 5, 6]
    assert [t for t in before if t[0] <= 3] == expected[:3], "the two runs are deterministic up to the kill"
    assert after == expected[3:], "same batches and bit-identical losses after the resume point"
    epoch0 = " ".join(t[2] for t in expected[:4]).split()
    assert len(epoch0) == len(set(epoch0)) == 16, "one epoch sees each of the 16 samples once"

    a, b = weights(ref), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-identical final weights"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r["train_loss"]] == [1, 2, 3, 4, 5, 6]

    # Everything in the checkpoint loads with weights_only=True, our own state included.
    ckpt = torch.load(run / LAST, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    monitor = ckpt["callbacks"]["StageMonitor"]
    assert monitor["recipe"]["name"] == "tiny-resumed" and monitor["recipe"]["model"]["rwkv"]["n_layer"] == 1
    assert isinstance(monitor["rng"][0]["torch"], torch.Tensor) and len(monitor["rng"]) == 1
    assert ckpt["StageData"]["epoch"] == 1 and ckpt["StageData"]["consumed"] == 8
    assert [e["step"] for e in read_manifest(run)] == [6, 3]
    assert not list(run.glob(".*tmp*")), "no temp files left behind"


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_checkpoint(shapes, tmp_path):
    out = tmp_path / "out"
    args = stage_args(shapes, out, pretrain__save_every_steps=1, pretrain__val_every_steps=0, pretrain__max_steps=4)
    proc = subprocess.Popen(cli(args), cwd=tmp_path, env=cli_env(**{PAUSE_ENV: "2"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: landed(out, 1), proc, "the step-1 checkpoint")
    # The step-2 save has written its temp file and manifest and is about to rename: kill it.
    wait_for(lambda: any(e["step"] == 2 for e in read_manifest(out) or []) and (out / f".{LAST}.tmp").exists(),
             proc, "the step-2 checkpoint write")  # fmt: skip
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    path, entry, warnings = find_resumable(out)
    assert path == out / LAST and entry["step"] == 1 and not warnings
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["StageData"]["consumed"] == 4


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_with_143(shapes, tmp_path):
    out = tmp_path / "out"
    args = stage_args(shapes, out, pretrain__max_steps=40, pretrain__save_every_steps=100, pretrain__val_every_steps=0)
    proc = subprocess.Popen(cli(args), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: bool(trace(out)), proc, "the first training step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    found = re.search(r"stopped by SIGTERM at step (\d+); resume with --resume", err)
    assert found, err[-3000:]
    step = int(found.group(1))
    path, entry, _ = find_resumable(out)
    assert step >= 1 and entry["step"] == step
    assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == step

    # Resuming with a different model is refused before any training.
    refused = subprocess.run(cli(args, "model.rwkv.n_layer=2", "--resume"), cwd=tmp_path, env=cli_env(),
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 1
    assert "the model differs from the checkpoint's" in refused.stderr and "model.rwkv.n_layer: 1 -> 2" in refused.stderr
    assert len(trace(out)) == step, "nothing trained"


# -- in process: RNG, non-finite steps, out of memory ------------------------------------------


class Crash(Exception):
    """Stands in for a process dying right after a checkpoint."""


def tiny_recipe(data: Path, out: Path, **extra: object):
    return load_recipe(RECIPE, stage_args(data, out, **extra))


@pytest.mark.slow
def test_resume_restores_rng_so_random_ops_match_the_unbroken_run(shapes, tmp_path, monkeypatch):
    """A random factor in the loss (like dropout) makes the weights depend on the RNG stream;
    validation at the checkpoint step draws from it too."""
    from vrwkv_core.train import run_stage
    from vrwkv_core.train.callbacks import StageMonitor
    from vrwkv_core.train.module import StageModule

    forward = StageModule.forward

    def noisy(self, batch):
        loss, n = forward(self, batch)
        return loss * (1 + torch.rand(())), n

    monkeypatch.setattr(StageModule, "forward", noisy)
    kw = {"pretrain__max_steps": 4, "pretrain__save_every_steps": 2, "pretrain__val_every_steps": 2}
    run_stage(tiny_recipe(shapes, tmp_path / "ref", **kw), "pretrain")

    save = StageMonitor.save_resumable

    def save_then_die(self, trainer):
        save(self, trainer)
        if trainer.global_step == 2:
            raise Crash

    monkeypatch.setattr(StageMonitor, "save_resumable", save_then_die)
    with pytest.raises(Crash):
        run_stage(tiny_recipe(shapes, tmp_path / "run", **kw), "pretrain")
    monkeypatch.setattr(StageMonitor, "save_resumable", save)
    run_stage(tiny_recipe(shapes, tmp_path / "run", **kw), "pretrain", resume=True)
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def inject(monkeypatch, bad: dict[int, str]) -> None:
    from vrwkv_core.train.module import StageModule

    forward = StageModule.forward

    def broken(self, batch):
        loss, n = forward(self, batch)
        kind = bad.get(self.global_step + 1)
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":
            loss = NanGrad.apply(loss)
        return loss, n

    monkeypatch.setattr(StageModule, "forward", broken)


def adam_steps(ckpt: dict) -> int:
    return int(next(iter(ckpt["optimizer_states"][0]["state"].values()))["step"])


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(shapes, tmp_path, monkeypatch):
    from vrwkv_core.train import run_stage
    from vrwkv_core.train.failures import TrainingStopped

    inject(monkeypatch, {2: "grad", 3: "loss"})
    out = run_stage(tiny_recipe(shapes, tmp_path / "a", pretrain__max_steps=4, pretrain__val_every_steps=0), "pretrain")
    ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and adam_steps(ckpt) == 2, "steps 2 and 3 were not applied"
    assert ckpt["callbacks"]["StageMonitor"]["bad_total"] == 2
    losses = {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(open(out / "metrics.csv"))}
    assert math.isfinite(losses[2]) and math.isnan(losses[3]) and math.isfinite(losses[4])

    inject(monkeypatch, {2: "loss", 3: "loss", 4: "loss"})
    recipe = tiny_recipe(shapes, tmp_path / "b", pretrain__max_steps=6, pretrain__val_every_steps=0)
    recipe.pretrain.max_bad_steps = 2  # getattr-read until the schema has the field
    with pytest.raises(TrainingStopped, match="stopped at step 3: 2 steps in a row had a non-finite loss") as info:
        run_stage(recipe, "pretrain")
    assert "max_bad_steps" in info.value.hint and "lr_init" in info.value.hint
    ckpt = torch.load(tmp_path / "b" / LAST, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and adam_steps(ckpt) == 1, "the checkpoint holds the last good weights"


def test_out_of_memory_names_the_knobs(shapes, tmp_path, monkeypatch):
    from vrwkv_core.train import run_stage
    from vrwkv_core.train.module import StageModule

    def oom(self, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StageModule, "forward", oom)
    with pytest.raises(VrwkvError, match="out of memory at step 0 of pretrain") as info:
        run_stage(tiny_recipe(shapes, tmp_path / "o"), "pretrain")
    for knob in ("pretrain.micro_batch", "hardware.grad_checkpoint=true", "hardware.precision=bf16"):
        assert knob in info.value.hint


# -- units: manifest, fallback, drift -------------------------------------------------------


def test_resume_falls_back_to_prev_when_last_is_damaged(tmp_path):
    (tmp_path / LAST).write_bytes(b"new" * 1000)
    (tmp_path / PREV).write_bytes(b"old" * 1000)
    write_manifest(tmp_path, [{"file": LAST, "step": 4, "sha256": sha256_of(tmp_path / LAST)},
                              {"file": PREV, "step": 2, "sha256": sha256_of(tmp_path / PREV)}])  # fmt: skip
    assert find_resumable(tmp_path)[:2] == (tmp_path / LAST, {"file": LAST, "step": 4, "sha256": sha256_of(tmp_path / LAST)})
    assert not find_resumable(tmp_path)[2]

    with open(tmp_path / LAST, "r+b") as f:  # a torn write
        f.truncate(1500)
    path, entry, warnings = find_resumable(tmp_path)
    assert path == tmp_path / PREV and entry["step"] == 2
    assert any("last.ckpt is damaged" in w for w in warnings) and any("falling back to prev.ckpt (step 2)" in w for w in warnings)

    (tmp_path / PREV).write_bytes(b"bad")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_resumable(tmp_path)
    (tmp_path / MANIFEST).unlink()  # without a manifest a checkpoint must load completely (issue 22)
    with pytest.raises(CheckpointError, match="no intact checkpoint .*skipped last.ckpt: does not load"):
        find_resumable(tmp_path)
    (tmp_path / LAST).unlink()
    (tmp_path / PREV).unlink()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        find_resumable(tmp_path)


class _Strategy:
    def barrier(self, name: str) -> None:
        pass


class _Trainer:
    """What CheckpointWriter uses of a Trainer; save_checkpoint writes the step as bytes."""

    is_global_zero = True
    strategy = _Strategy()

    def __init__(self) -> None:
        self.step = 0

    def save_checkpoint(self, path: str, weights_only: bool = False) -> None:
        Path(path).write_bytes(f"step {self.step}".encode())


def test_checkpoint_writer_rotates_and_keeps_the_manifest_true(tmp_path):
    (tmp_path / LAST).write_bytes(b"a stale run")
    (tmp_path / PREV).write_bytes(b"an older stale run")
    trainer, writer = _Trainer(), CheckpointWriter(tmp_path)
    for step in (10, 20, 30):
        trainer.step = step
        writer.save(trainer, step, {"name": "x"})
        entries = read_manifest(tmp_path)
        assert (tmp_path / LAST).read_bytes() == f"step {step}".encode()
        for e in entries:
            assert sha256_of(tmp_path / e["file"]) == e["sha256"] and (tmp_path / e["file"]).read_bytes() == f"step {e['step']}".encode()
    assert [(e["file"], e["step"]) for e in entries] == [(LAST, 30), (PREV, 20)]
    assert entries[0]["recipe"] == {"name": "x"}
    # a fresh run never keeps a stale file as prev
    assert not (tmp_path / PREV).read_bytes().startswith(b"an older")
    # resumed from prev (last was damaged): the damaged last is replaced, prev kept
    (tmp_path / LAST).write_bytes(b"garbage")
    path, entry, _ = find_resumable(tmp_path)
    writer = CheckpointWriter(tmp_path, [entry])
    trainer.step = 40
    writer.save(trainer, 40, {})
    assert [(e["file"], e["step"]) for e in read_manifest(tmp_path)] == [(LAST, 40), (PREV, 20)]
    assert (tmp_path / PREV).read_bytes() == b"step 20"


def test_folder_checkpoints_hash_every_file(tmp_path):
    ckpt = tmp_path / "ds"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint")
    (ckpt / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    first = sha256_of(ckpt)
    (ckpt / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"weightz")
    assert sha256_of(ckpt) != first
    (ckpt / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    assert sha256_of(ckpt.rename(tmp_path / "moved")) == first, "names inside count, not the folder's"
    (tmp_path / "moved" / "latest").rename(tmp_path / "moved" / "newest")
    assert sha256_of(tmp_path / "moved") != first


def test_recipe_drift_reports_changes_and_refuses_a_different_model():
    old = load_recipe(RECIPE, ["pretrain.lr_init=0.001"])
    from vrwkv_core.config import recipe_to_dict

    same = recipe_drift(recipe_to_dict(old), recipe_to_dict(old), "pretrain")
    assert same == []
    new = load_recipe(RECIPE, ["pretrain.lr_init=0.002", "pretrain.max_steps=999", "model.rwkv.checkpoint=x.pth"])
    lines = recipe_drift(recipe_to_dict(old), recipe_to_dict(new), "pretrain")
    assert "pretrain.lr_init: 0.001 -> 0.002" in lines and "pretrain.max_steps: 150 -> 999" in lines
    assert any(line.startswith("model.rwkv.checkpoint") for line in lines)  # a path only: allowed
    wider = load_recipe(RECIPE, ["model.rwkv.n_embd=256"])
    with pytest.raises(RecipeError, match=r"the model differs .*model.rwkv.n_embd: 128 -> 256"):
        recipe_drift(recipe_to_dict(old), recipe_to_dict(wider), "pretrain")
