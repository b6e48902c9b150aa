"""`vrwkv bench train`: the trainable shares at the 0.1B shape, the loss on labelled positions
(the trainer's), grad checkpointing on by default, and the per-method rows."""

from __future__ import annotations

import math

import pytest
import torch

import vrwkv_core.bench.train as bench_train
from vrwkv_core.bench.train import answer_labels, build_lm, labelled_loss, run_train_bench
from vrwkv_core.data.conversation import IGNORE_INDEX
from vrwkv_core.train.module import sequence_loss


def _cfg(**kw) -> dict:
    cfg = {"n_layer": 2, "n_embd": 128, "vocab": 300, "head_size": 64, "rank": 8, "alpha": 16.0,
           "grad_checkpoint": True, "device": "cpu"}  # fmt: skip
    return {**cfg, **kw}


def test_lora_r64_share_of_the_0b1_lm_for_default_six_and_attention_targets() -> None:
    # 0.1B: L12 D768, untied head (the released file's 191,034,624 LM parameters); on meta, no memory
    cfg = _cfg(n_layer=12, n_embd=768, vocab=65536, rank=64, alpha=128.0, device="meta")
    trainable = {}
    for method in ("full", "lora", "lora-all", "lora-att", "state"):
        lm, total = build_lm(method, cfg)
        assert total == 191_034_624
        trainable[method] = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    # the recipe's default targets (att r/k/v/o + ffn.value) keep r64 under 5% of the LM
    assert trainable["lora"] == 12 * 64 * (4 * (768 + 768) + (3072 + 768)) == 7_667_712
    assert trainable["lora"] / 191_034_624 < 0.05
    assert trainable["lora-all"] == 12 * 64 * (4 * (768 + 768) + 2 * (768 + 3072)) == 10_616_832  # 5.56%
    assert trainable["lora-att"] == 12 * 64 * 4 * (768 + 768) == 4_718_592  # 2.47%
    assert trainable["state"] == 12 * 12 * 64 * 64
    assert trainable["full"] == 191_034_624 - 65536 * 768  # all but the embedding


def test_answer_labels_keep_the_last_share_of_each_sample() -> None:
    ids = torch.arange(9).unsqueeze(0)  # [1, T+1], T = 8
    labels = answer_labels(ids, 0.5)  # 4 of the 7 next-token targets
    assert labels.tolist() == [[IGNORE_INDEX] * 4 + [4, 5, 6, 7]]
    assert (answer_labels(ids, 1.0)[:, 1:] != IGNORE_INDEX).all()


def test_labelled_loss_runs_the_head_on_the_answer_only_and_equals_the_trainers(monkeypatch) -> None:
    torch.manual_seed(0)
    V, C = 50, 16
    head = torch.nn.Linear(C, V, bias=False)
    ids = torch.randint(0, V, (2, 13))
    labels = answer_labels(ids, 0.25)  # 3 targets per sample
    hidden = torch.randn(2, 12, C)
    rows = []
    real = bench_train.linear_cross_entropy
    monkeypatch.setattr(bench_train, "linear_cross_entropy", lambda h, w, t: rows.append(h.shape[0]) or real(h, w, t))
    loss = labelled_loss(hidden, labels, head)
    assert rows == [6]
    ref, n_tokens = sequence_loss(hidden, labels, head)
    assert n_tokens == 6 and torch.allclose(loss, ref, rtol=1e-6)
    torch.nn.init.zeros_(head.weight)  # uniform logits: CE = log V
    assert labelled_loss(hidden, labels, head).item() == pytest.approx(math.log(V), rel=1e-6)


@pytest.mark.parametrize(("grad_checkpoint", "calls"), [(True, 2), (False, 1)])
def test_bench_recomputes_each_block_in_backward_by_default(grad_checkpoint: bool, calls: int) -> None:
    lm, _ = build_lm("lora", _cfg(grad_checkpoint=grad_checkpoint))
    seen = []
    for block in lm.blocks:
        block.register_forward_pre_hook(lambda m, inp: seen.append(m))  # a recompute may stop early: no post hook
    ids = torch.randint(0, 300, (1, 17))
    hidden, _ = lm(ids[:, :-1], logits="hidden")
    labelled_loss(hidden, answer_labels(ids, 0.25), lm.head).backward()
    assert len(seen) == calls * len(lm.blocks)
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)


@pytest.mark.slow
def test_bench_train_rows_per_method() -> None:
    L, C, V, r = 2, 128, 1000, 8
    rows = {row["method"]: row for row in run_train_bench(n_layer=L, n_embd=C, vocab=V, T=16, steps=1, rank=r,
                                                          threads=1, methods=("full", "lora", "state"))}  # fmt: skip
    total = rows["full"]["lm_params"]
    assert rows["full"]["trainable"] == total - V * C  # everything but the embedding
    assert rows["lora"]["trainable"] == L * r * (4 * 2 * C + (C + 4 * C))
    assert rows["state"]["trainable"] == L * (C // 64) * 64 * 64
    assert rows["lora"]["trains"] == "default: att + ffn.value (5 matrices)"
    assert all(row["peak_mib"] > 0 and row["step_s"] > 0 for row in rows.values())
    assert rows["full"]["mem_vs_full"] == 1.0


def test_bench_train_refuses_a_labelled_share_outside_0_1() -> None:
    with pytest.raises(ValueError, match="labelled must be in"):
        run_train_bench(labelled=0.0)
