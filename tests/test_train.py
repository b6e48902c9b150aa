"""Training: schedule, loss, freezing, strategy checks, input checks, and a short real run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vrwkv_core.config import load_recipe
from vrwkv_core.errors import CheckpointError, DataError, RecipeError
from vrwkv_core.train.module import apply_trainable, lr_at, sequence_loss

REPO = Path(__file__).resolve().parents[1]


def test_lr_schedule_warmup_then_cosine():
    st = load_recipe(None, ["pretrain.lr_init=1e-3", "pretrain.lr_final=1e-5", "pretrain.warmup_steps=10",
                            "pretrain.max_steps=110"]).pretrain  # fmt: skip
    assert lr_at(0, st) == pytest.approx(1e-4)
    assert lr_at(9, st) == pytest.approx(1e-3)
    assert lr_at(10, st) == pytest.approx(1e-3)
    assert lr_at(60, st) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(110, st) == pytest.approx(1e-5)
    assert lr_at(500, st) == pytest.approx(1e-5)


def test_sequence_loss_is_per_sample_mean_then_batch_mean():
    torch.manual_seed(0)
    B, T, C, V = 2, 6, 8, 11
    head = torch.nn.Linear(C, V, bias=False)
    hidden = torch.randn(B, T, C)
    labels = torch.full((B, T), -100)
    labels[0, 2:4] = torch.tensor([3, 4])  # targets at positions 1, 2
    labels[1, 1:6] = torch.tensor([1, 2, 3, 4, 5])  # 5 targets
    loss, n = sequence_loss(hidden, labels, head)
    logits = head(hidden)
    per = []
    for b in range(B):
        rows = [t for t in range(T - 1) if labels[b, t + 1] != -100]
        per.append(F.cross_entropy(logits[b, rows], labels[b, [r + 1 for r in rows]]))
    assert n == 7
    assert loss.item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-6)
    # a sample with no labels is left out of the mean, and an empty batch gives 0
    labels[1] = -100
    loss1, n1 = sequence_loss(hidden, labels, head)
    assert n1 == 2 and loss1.item() == pytest.approx(per[0].item(), rel=1e-6)
    loss0, n0 = sequence_loss(hidden, torch.full((B, T), -100), head)
    assert n0 == 0 and loss0.item() == 0.0


def test_l2wrap_leaves_the_loss_and_adds_the_originals_gradient():
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 5, bias=False)
    hidden, labels = torch.randn(1, 3, 4), torch.tensor([[-100, 1, 2]])
    base, _ = sequence_loss(hidden, labels, head)
    h = hidden.clone().requires_grad_(True)
    wrapped, _ = sequence_loss(h, labels, head, l2wrap=0.1)
    assert wrapped.item() == base.item()  # the value is untouched
    wrapped.backward()
    h0 = hidden.clone().requires_grad_(True)
    sequence_loss(h0, labels, head)[0].backward()
    # by hand: d/dh of sum_t (0.1 / (B*T)) * max_t * logit_t[argmax_t], max held constant
    y = head(hidden).detach()[0]  # [T, V]
    extra = torch.stack([(0.1 / 3) * y[t].max() * head.weight[y[t].argmax()] for t in range(3)])
    assert torch.allclose(h.grad[0] - h0.grad[0], extra, atol=1e-6)


def test_released_freezing(tiny_recipe):
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", ["pretrain.trainable=[projector]",
                                                           "finetune.trainable=[projector,rwkv]",
                                                           "finetune.frozen=[rwkv.emb]"])  # fmt: skip
    model = VisualRWKV(recipe.model)
    apply_trainable(model, recipe.pretrain)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("proj.") for n in trainable)
    model.train()  # frozen towers stay in eval mode
    assert not any(m.training for m in list(model.vit.modules())[1:])
    apply_trainable(model, recipe.finetune)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "rwkv.emb.weight" not in trainable and "rwkv.head.weight" in trainable
    assert any(n.startswith("proj.") for n in trainable) and not any(n.startswith("vit.") for n in trainable)


def test_deepspeed_config_from_hardware():
    from vrwkv_core.train.deepspeed_config import deepspeed_config

    hw = load_recipe(None, ["hardware.strategy=deepspeed_stage_2", "hardware.ds_bucket_mb=100",
                            "hardware.cpu_offload=true"]).hardware  # fmt: skip
    cfg = deepspeed_config(hw, micro_batch=8)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 100_000_000
    assert cfg["zero_optimization"]["allgather_bucket_size"] == 100_000_000
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in cfg["zero_optimization"], "parameters are offloaded at stage 3 only"
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    # Lightning fills these from the Trainer (grad_clip, grad_accum); a value here would win.
    assert "gradient_clipping" not in cfg and "gradient_accumulation_steps" not in cfg
    assert cfg["zero_force_ds_cpu_optimizer"] is False, "offload must accept the torch AdamW fallback"
    hw3 = load_recipe(None, ["hardware.strategy=deepspeed_stage_3", "hardware.precision=fp32"]).hardware
    cfg3 = deepspeed_config(hw3)
    assert cfg3["zero_optimization"]["stage"] == 3 and cfg3["bf16"]["enabled"] is False
    assert cfg3["zero_optimization"]["stage3_prefetch_bucket_size"] == 200_000_000
    assert "offload_optimizer" not in cfg3["zero_optimization"] and "train_micro_batch_size_per_gpu" not in cfg3
    hw3o = load_recipe(None, ["hardware.strategy=deepspeed_stage_3", "hardware.cpu_offload=true"]).hardware
    assert deepspeed_config(hw3o)["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert deepspeed_config(load_recipe(None, ["hardware.strategy=deepspeed_stage_1"]).hardware)["zero_optimization"]["stage"] == 1


def test_optimizer_choice_falls_back_to_torch_adamw(monkeypatch):
    import sys

    from vrwkv_core.train.module import build_optimizer

    st = load_recipe(None, ["pretrain.lr_init=0.01"]).pretrain
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3, 3))], "weight_decay": 0.1}]
    opt, name = build_optimizer(groups, st, load_recipe(None, []).hardware)
    assert isinstance(opt, torch.optim.AdamW) and name == "torch AdamW (fused)"
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[0]["weight_decay"] == 0.1
    # DeepSpeed's ops cannot be built (here: cannot even be imported): AdamW, and the log says why.
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", None)
    hw = load_recipe(None, ["hardware.strategy=deepspeed_stage_2", "hardware.cpu_offload=true"]).hardware
    opt, name = build_optimizer(groups, st, hw)
    assert isinstance(opt, torch.optim.AdamW) and "DeepSpeed's Adam could not be built" in name
    opt, name = build_optimizer(groups, st, load_recipe(None, ["hardware.strategy=deepspeed_stage_1"]).hardware)
    assert isinstance(opt, torch.optim.AdamW) and name.startswith("torch AdamW (fused)")


def test_several_devices_mean_ddp_and_rank_zero_is_read_from_the_launch_env(monkeypatch):
    from vrwkv_core.train.strategy import is_launch_rank_zero, trainer_hardware

    hw = trainer_hardware(load_recipe(None, ["hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=fp32"]).hardware)
    assert hw == {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "precision": "32-true", "strategy": "ddp"}
    assert trainer_hardware(load_recipe(None, ["hardware.accelerator=cpu"]).hardware)["strategy"] == "auto"
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert is_launch_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's second process on a node
    assert not is_launch_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # the first process of the second node
    assert not is_launch_rank_zero()
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # an interactive one-task allocation: not a rank
    assert is_launch_rank_zero()
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert not is_launch_rank_zero()
    monkeypatch.setenv("RANK", "0")  # torchrun's RANK wins
    assert is_launch_rank_zero()


def test_importing_training_code_does_not_import_deepspeed():
    import subprocess
    import sys

    code = ("import sys, vrwkv_core.train.runner, vrwkv_core.train.module, vrwkv_core.train.callbacks, "
            "vrwkv_core.train.strategy, vrwkv_core.train.deepspeed_config, vrwkv_cli.train; "
            "sys.exit('deepspeed' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("override", ["hardware.strategy=deepspeed_stage_1", "hardware.accelerator=gpu",
                                      "hardware.strategy=deepspeed_stage_3 hardware.accelerator=cpu"])
def test_gpu_requests_fail_early_without_gpu(override):
    from vrwkv_core.train.strategy import trainer_hardware

    with pytest.raises(RecipeError, match="no CUDA GPU"):
        trainer_hardware(load_recipe(None, override.split()).hardware)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_run_stage_checks_the_hardware_before_anything_else(tmp_path):
    from vrwkv_core.train import run_stage

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"data.root={tmp_path / 'none'}", "data.synthetic=false",
                                                           "hardware.strategy=deepspeed_stage_1"])  # fmt: skip
    with pytest.raises(RecipeError, match="asks for DeepSpeed but this machine has no CUDA GPU"):
        run_stage(recipe, "pretrain")
    assert not (tmp_path / "none").exists()


def test_missing_inputs_are_reported_before_building(tmp_path):
    from vrwkv_core.progress import NULL_PROGRESS
    from vrwkv_core.train.runner import check_inputs

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"data.root={tmp_path / 'nope'}", "data.synthetic=false"])
    with pytest.raises(DataError, match="pretrain.jsonl: training records not found"):
        check_inputs(recipe, "pretrain", False, NULL_PROGRESS)
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "finetune.jsonl").write_text("")
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"data.root={tmp_path / 'd'}",
                                                           f"finetune.init_from={tmp_path / 'no_pretrain'}"])  # fmt: skip
    with pytest.raises(CheckpointError, match="init_from") as info:
        check_inputs(recipe, "finetune", False, NULL_PROGRESS)
    assert "vrwkv pretrain" in info.value.hint
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"data.root={tmp_path / 'd'}", "finetune.init_from=null",
                                                           f"finetune.out_dir={tmp_path / 'o'}"])  # fmt: skip
    with pytest.raises(CheckpointError, match="nothing to resume"):
        check_inputs(recipe, "finetune", True, NULL_PROGRESS)


def test_short_run_writes_outputs_and_learns(tiny_trained):
    from vrwkv_core.checkpoint import load_pretrained

    for stage in ("pretrain", "finetune"):
        out = tiny_trained[stage]
        for name in ("config.yaml", "model.safetensors", "last.ckpt", "metrics.csv", "loss.png"):
            assert (out / name).is_file(), f"{stage}/{name}"
        rows = list(csv.DictReader(open(out / "metrics.csv")))
        losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
        assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
        assert any(r["val_loss"] for r in rows)
        assert not list(out.glob(".*tmp*")), "no temp files left behind"
    pre = [float(r["train_loss"]) for r in csv.DictReader(open(tiny_trained["pretrain"] / "metrics.csv")) if r["train_loss"]]
    assert pre[-1] < pre[0], "the loss goes down in a few steps"
    model, recipe = load_pretrained(tiny_trained["finetune"])
    assert recipe.model.vision.towers == ["tiny"]
    ckpt = torch.load(tiny_trained["finetune"] / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6


def test_v6_trains_through_both_stages_from_the_cli(tmp_path: Path, tokenizer) -> None:
    """`vrwkv pretrain` + `vrwkv finetune` build, train and save an x060 model (tiny sizes):
    stage 1 with the image first, stage 2 and the saved model with the middle placement;
    the result loads as RWKV-6 and answers in chat."""
    from PIL import Image

    from vrwkv_cli.main import run
    from vrwkv_core.data.shapes import prepare_shapes
    from vrwkv_core.infer import ChatSession, GenerationConfig, load_model
    from vrwkv_core.model.rwkv.rwkv6 import RWKV6

    data = prepare_shapes(tmp_path / "shapes", n_train=24, n_eval=4, seed=2)
    common = [
        f"data.root={data}", "data.ctx_len=96", "data.val_fraction=0",
        "model.rwkv.version=x060", "model.rwkv.n_layer=2", "model.rwkv.n_embd=64", "model.rwkv.head_size=32",
        "model.vision.image_size=32", "model.vision.tiny.width=32", "model.vision.tiny.depth=1",
        "model.tokens_per_image=16", "model.projector.type=linear", "model.image_position=middle",
        "pretrain.image_position=first", f"pretrain.out_dir={tmp_path / 'pre'}",
        f"finetune.out_dir={tmp_path / 'ft'}", f"finetune.init_from={tmp_path / 'pre'}",
    ]  # fmt: skip
    for stage in ("pretrain", "finetune"):
        steps = [f"{stage}.max_steps=2", f"{stage}.micro_batch=4", f"{stage}.warmup_steps=0"]
        assert run([stage, str(REPO / "recipes" / "tiny.yaml"), *common, *steps]) == 0
    for out in (tmp_path / "pre", tmp_path / "ft"):
        assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
        rows = list(csv.DictReader(open(out / "metrics.csv")))
        assert [r["train_loss"] for r in rows if r["train_loss"]] and all(
            math.isfinite(float(r["train_loss"])) for r in rows if r["train_loss"]
        )

    vlm = load_model(tmp_path / "ft", device="cpu")
    assert isinstance(vlm.rwkv, RWKV6) and vlm.config.image_position == "middle"
    session = ChatSession(vlm, config=GenerationConfig(max_new_tokens=3))
    session.add_image(Image.open(data / "images" / "eval_00000.png").convert("RGB"))
    gen = session.ask("How many shapes are there?")
    text = "".join(gen)
    assert gen.result.n_prompt_tokens > 16 and 1 <= gen.result.n_new_tokens <= 3 and text == gen.result.text
