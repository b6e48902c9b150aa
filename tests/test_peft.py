"""LoRA / PiSSA / MiSS (through peft) and RWKV state tuning: the model pieces, the recipe
section, tiny finetunes with each method, merge-export, --adapter/--state loading, base checks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_vlm, rel
from safetensors import safe_open

from vrwkv_core.checkpoint.adapters import ADAPTER, STATE, apply_adapter, export_merged, inject, merge_adapters
from vrwkv_core.checkpoint.load import load_checkpoint
from vrwkv_core.config import DEFAULT_PEFT_TARGETS, PEFT_TARGETS, PeftSection, RWKVSection, load_recipe
from vrwkv_core.errors import CheckpointError, RecipeError
from vrwkv_core.model.rwkv.rwkv7 import RWKV7
from vrwkv_core.train.peft import check_peft_strategy, setup_peft

REPO = Path(__file__).resolve().parents[1]


def _lm(seed: int = 0) -> RWKV7:
    """A tiny RWKV-7 with every weight nudged off its init (whose zero matrices hide adapters)."""
    torch.manual_seed(seed)
    lm = RWKV7(RWKVSection(n_layer=2, n_embd=128, head_size=64, vocab_size=300))
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return lm.eval()


def _nudge_adapters(lm: torch.nn.Module) -> None:
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if ".lora_" in n or ".miss_" in n:
                p.add_(torch.randn_like(p) * 0.05)


# -- recipe ---------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("finetune.peft.method=qlora", "finetune.peft.method: 'qlora' is not one of lora, miss, state"),
    ("finetune.peft.targets=[att.gate]", "finetune.peft.targets: unknown layer 'att.gate'"),
    ("finetune.peft.r=0", "finetune.peft.r: must be positive"),
    ("finetune.peft.dropout=1.5", "finetune.peft.dropout: must be in [0, 1)"),
])  # fmt: skip
def test_peft_section_errors_name_the_key(override: str, message: str) -> None:
    method = [] if "method" in override else ["finetune.peft.method=lora"]
    with pytest.raises(RecipeError) as err:
        load_recipe(REPO / "recipes" / "tiny.yaml", method + [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_pissa_is_refused_for_miss_and_state() -> None:
    with pytest.raises(RecipeError, match="finetune.peft.init: pissa is a LoRA initialisation"):
        load_recipe(REPO / "recipes" / "tiny.yaml", ["finetune.peft.method=miss", "finetune.peft.init=pissa"])


# -- model pieces ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "miss"])
def test_peft_wraps_our_linear_in_prefill_and_decode_and_merges_exactly(method: str) -> None:
    lm = _lm()
    ids = torch.randint(0, 300, (2, 7))
    base, _ = lm(ids)
    inject(lm, PeftSection(method=method, r=4, alpha=8.0))
    names = [n for n, _ in lm.named_parameters() if f".{method}_" in n]
    assert len(names) == (2 if method == "lora" else 1) * len(DEFAULT_PEFT_TARGETS) * 2  # per target, per layer
    assert torch.equal(lm(ids)[0], base)  # both inits leave the model unchanged
    _nudge_adapters(lm)
    adapted, _ = lm(ids)
    assert rel(adapted, base) > 1e-3
    # decode (the T=1 step path calls linear() on the wrapped layers) continues the prefill exactly
    _, state = lm(ids[:, :6])
    step, _ = lm(ids[:, 6:], state=state)
    assert rel(step[:, -1], adapted[:, -1]) < 1e-5
    assert merge_adapters(lm) == 2 * len(DEFAULT_PEFT_TARGETS)
    assert type(lm.blocks[0].att.key).__name__ == "Linear" and not any(f"{method}_" in n for n, _ in lm.named_parameters())
    assert rel(lm(ids)[0], adapted) <= 1e-5


def test_pissa_moves_the_principal_part_into_the_adapter() -> None:
    lm = _lm()
    ids = torch.randint(0, 300, (1, 6))
    base, _ = lm(ids)
    w = lm.blocks[0].att.key.weight.detach().clone()
    init = inject(lm, PeftSection(method="lora", r=4, alpha=8.0, init="pissa"))
    assert len(init) == 2 * 2 * len(DEFAULT_PEFT_TARGETS)
    assert rel(lm(ids)[0], base) < 1e-5  # residual + principal part = the weight
    assert not torch.allclose(lm.blocks[0].att.key.base_layer.weight, w)  # the residual


def test_learned_initial_state_starts_every_forward_and_gets_gradients() -> None:
    lm = _lm()
    ids = torch.randint(0, 300, (2, 6))
    base, _ = lm(ids)
    p = lm.enable_state_tuning()
    assert tuple(p.shape) == (2, 2, 64, 64) and torch.equal(lm(ids)[0], base)  # zeros: unchanged
    with torch.no_grad():
        p.normal_()
    out, _ = lm(ids)
    out.square().mean().backward()
    assert rel(out, base) > 1e-3 and p.grad is not None and p.grad.abs().sum() > 0
    _, state = lm(ids[:, :5])  # prefill from the learned state, then decode
    assert rel(lm(ids[:, 5:], state=state)[0][:, -1], out[:, -1].detach()) < 1e-5
    fresh = _lm()
    fresh.set_initial_state(lm.initial_state())  # what --state does
    assert rel(fresh(ids)[0], out.detach()) < 1e-6


# -- tiny finetunes -------------------------------------------------------------------
METHODS = {
    "lora": ["finetune.peft.method=lora", "finetune.peft.r=4", "finetune.peft.alpha=8"],
    "pissa": ["finetune.peft.method=lora", "finetune.peft.r=4", "finetune.peft.alpha=8", "finetune.peft.init=pissa"],
    "miss": ["finetune.peft.method=miss", "finetune.peft.r=4"],
    "state": ["finetune.peft.method=state", "finetune.peft.state_lr=0.5"],
}


@pytest.mark.parametrize("method", ["lora", "state"])
def test_peft_under_deepspeed_zero3_is_refused_in_one_line_naming_the_key(method: str) -> None:
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"finetune.peft.method={method}",
                                                          "hardware.strategy=deepspeed_stage_3"])  # fmt: skip
    vlm = build_tiny_vlm()
    with pytest.raises(RecipeError) as err:
        setup_peft(vlm, recipe, "finetune")
    assert str(err.value).startswith("hardware.strategy: deepspeed_stage_3 cannot train finetune.peft")
    assert "\n" not in str(err.value)
    assert all(p.requires_grad for p in vlm.rwkv.parameters())  # refused before anything was frozen
    for ok in (["hardware.strategy=deepspeed_stage_2"], ["finetune.peft.method=null", "hardware.strategy=deepspeed_stage_3"]):
        check_peft_strategy(load_recipe(REPO / "recipes" / "tiny.yaml", [f"finetune.peft.method={method}", *ok]), "finetune")


def _run(tiny_trained, name: str, extra: list[str], resume: bool = False) -> Path:
    from vrwkv_core.train import run_stage

    out = tiny_trained["root"] / f"peft-{name}"
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", tiny_trained["overrides"] + [
        f"finetune.out_dir={out}", "finetune.micro_batch=4", "finetune.val_every_steps=0",
        "finetune.save_every_steps=2", "finetune.warmup_steps=0", *extra])  # fmt: skip
    return run_stage(recipe, "finetune", resume=resume)


@pytest.fixture(scope="module")
def peft_runs(tiny_trained):
    """One tiny finetune per method from the tiny pretrain (LoRA stopped at 2 steps and resumed to 4)."""
    runs = {}
    for name, extra in METHODS.items():
        if name == "lora":
            _run(tiny_trained, name, extra + ["finetune.max_steps=2"])
            runs[name] = _run(tiny_trained, name, extra + ["finetune.max_steps=4"], resume=True)
        else:
            runs[name] = _run(tiny_trained, name, extra + ["finetune.max_steps=4"])
    return runs


def _losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_tiny_finetune_trains_only_the_intended_tensors(peft_runs, tiny_trained, name: str) -> None:
    run = peft_runs[name]
    losses = _losses(run)
    assert len(losses) == 4 and losses[-1] < losses[0]  # (LoRA: steps 1-2, resumed, steps 3-4)
    assert not (run / "model.safetensors").exists()
    with safe_open(str(run / ADAPTER), "pt") as f:
        names = [k for k in f.keys() if not k.startswith("pissa_init.")]
        assert f.metadata()["base"] == str(tiny_trained["pretrain"])
    rwkv = sorted(k for k in names if k.startswith("rwkv."))
    marker = {"lora": ".lora_", "pissa": ".lora_", "miss": ".miss_", "state": "state_wkv"}[name]
    assert rwkv and all(marker in k for k in rwkv)
    # tiny: the projector trains fully; the tower, pretrained in stage 1, stays frozen
    assert {k.split(".")[0] for k in names} == {"rwkv", "proj"}
    full = (tiny_trained["pretrain"] / "model.safetensors").stat().st_size
    assert (run / ADAPTER).stat().st_size < full / 10
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(f"model.{k}" for k in names)
    assert (run / "last.ckpt").stat().st_size < full / 5
    # compare before/after: the base LM's weights are untouched, the trained tensors moved
    base, _ = load_checkpoint(tiny_trained["pretrain"])
    tuned, _ = load_checkpoint(tiny_trained["pretrain"])
    apply_adapter(tuned, run)
    before = base.state_dict()
    changed = set()
    for k, t in tuned.state_dict().items():
        plain = k.replace(".base_layer.", ".")
        if plain in before and not torch.equal(t, before[plain]):
            changed.add(plain.split(".")[0] if not plain.startswith("rwkv.") else plain)
    if name == "pissa":  # the residual W - s*B0A0 replaces each adapted weight, by design
        changed = {c for c in changed if not c.endswith(tuple(f"{t}.weight" for t in PEFT_TARGETS))}
    assert changed == {"proj"}
    if name == "state":
        assert tuned.rwkv.state_wkv.abs().sum() > 0 and (run / STATE).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "pissa", "miss"])
def test_merged_export_gives_the_unmerged_adapters_logits(peft_runs, tiny_trained, tmp_path, name: str) -> None:
    info = export_merged(peft_runs[name], tmp_path / "merged")
    merged, _ = load_checkpoint(tmp_path / "merged")
    adapted, _ = load_checkpoint(tiny_trained["pretrain"])
    apply_adapter(adapted, peft_runs[name], base=tiny_trained["pretrain"])
    ids = torch.randint(0, 65535, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = adapted(ids)
        out, _ = merged(ids)
        base, _ = load_checkpoint(tiny_trained["pretrain"])[0](ids)
    assert info["method"] == "lora" if name != "miss" else info["method"] == "miss"
    assert rel(out, ref) <= 1e-5 and rel(ref, base) > 1e-4


def _ask(vlm, image, question: str) -> str:
    from vrwkv_core.infer import ChatSession

    session = ChatSession(vlm)
    session.add_image(image)
    return "".join(session.ask(question, max_new_tokens=8, temperature=0.0))


@pytest.mark.slow
def test_a_state_file_in_chat_answers_as_the_state_runs_eval(peft_runs, tiny_trained, tmp_path) -> None:
    from vrwkv_core.eval.generate import run_eval
    from vrwkv_core.infer import load_image, load_model

    run, base = peft_runs["state"], tiny_trained["pretrain"]
    data = tiny_trained["data"]
    export_merged(run, tmp_path / "exported")
    state = tmp_path / "exported" / STATE
    assert state.is_file()
    by_run = run_eval(str(base), "shapes", data, tmp_path / "eval-run", limit=3, device="cpu", adapter=str(run))
    by_state = run_eval(str(base), "shapes", data, tmp_path / "eval-state", limit=3, device="cpu", state=str(state))
    answers = [[json.loads(line)["text"] for line in Path(r.merged).read_text().splitlines()] for r in (by_run, by_state)]
    assert len(answers[0]) == 3 and answers[0] == answers[1]
    q = json.loads((data / "eval" / "questions.jsonl").read_text().splitlines()[0])
    image = load_image(data / "images" / q["image"])
    with_state = load_model(base, device="cpu", state=state)
    with_run = load_model(base, device="cpu", adapter=run)
    plain = load_model(base, device="cpu")
    assert _ask(with_state, image, q["text"]) == _ask(with_run, image, q["text"])
    ids = torch.tensor([[33, 44, 55]])
    assert rel(with_state(ids)[0], plain(ids)[0]) > 1e-4  # the learned state changes what the model says
    cli = subprocess.run([sys.executable, "-m", "vrwkv_cli.main", "chat", "--model", str(base), "--state", str(state),
                          "--image", str(data / "images" / q["image"]), "--prompt", q["text"], "--max-new-tokens", "8",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == _ask(with_state, image, q["text"]).strip()


@pytest.mark.slow
def test_a_peft_run_against_the_wrong_base_is_refused_in_one_line(peft_runs, tiny_trained) -> None:
    run, wrong = peft_runs["lora"], tiny_trained["finetune"]
    cli = subprocess.run([sys.executable, "-m", "vrwkv_cli.main", "chat", "--model", str(wrong), "--adapter", str(run),
                          "--prompt", "hi", "--device", "cpu"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cli.returncode != 0 and "Traceback" not in cli.stderr
    lines = [line for line in cli.stderr.splitlines() if line.strip()]
    assert "trained on base" in lines[0] and str(tiny_trained["pretrain"]) in lines[0]
    vlm, _ = load_checkpoint(wrong)
    with pytest.raises(CheckpointError, match="trained on base"):
        apply_adapter(vlm, run, base=wrong)
    with pytest.raises(CheckpointError, match="trained on base"):  # resuming against another base
        _run(tiny_trained, "lora", METHODS["lora"] + ["finetune.max_steps=6", f"finetune.init_from={wrong}"], resume=True)
