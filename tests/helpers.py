"""Helpers shared by several test files: `from helpers import build_tiny_vlm, rel`.

Fixtures live in conftest.py; plain functions live here, so tests never import conftest.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from vrwkv_core.bench.lm import random_rwkv7_weights
from vrwkv_core.config import ModelSection, ProjectorSection, RWKVSection, TinyTowerSection, VisionSection
from vrwkv_core.model.visual_rwkv import VisualRWKV


def rel(x, ref) -> float:
    """max|x - ref| / std(ref), the logits tolerance of DESIGN.md."""
    return float((x.float() - ref.float()).abs().max() / ref.float().std())


def read_manifest(path: Path) -> dict[str, tuple[int, ...]]:
    """A reference manifest (name, shape, dtype per tab-separated line) -> {name: shape}."""
    out = {}
    for line in path.read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        out[name] = tuple(ast.literal_eval(shape))
    return out


def build_tiny_vlm(seed: int = 1, tokens_per_image: int = 4, model=None):
    """A VisualRWKV on non-degenerate random weights (eval mode): `model` (a ModelSection;
    default the `tiny` tower and a 2-layer RWKV-7), its LM from `random_rwkv7_weights`
    and a projector with visible output, so images change the answer."""
    cfg = model or ModelSection(
        rwkv=RWKVSection(n_layer=2, n_embd=64, head_size=32),
        vision=VisionSection(towers=["tiny"], image_size=32, tiny=TinyTowerSection(width=32, depth=1, heads=2, patch_size=8)),
        tokens_per_image=tokens_per_image,
    )
    torch.manual_seed(seed)
    vlm = VisualRWKV(cfg)
    vlm.rwkv.load_state_dict(random_rwkv7_weights(cfg.rwkv, seed=seed))
    with torch.no_grad():
        for p in vlm.proj.parameters():
            p.normal_(0.0, 0.5)
    return vlm.eval()


def check_half_checkpoint(cls, sd, path: Path, ids) -> None:
    """A half-precision official `.pth` loads as fp32 and as bf16; bf16 runs close to fp32
    (prefill and one more step) with an fp32 WKV state."""
    torch.save(sd, path)
    fp32 = cls.from_checkpoint(path)
    bf16 = cls.from_checkpoint(path, dtype=torch.bfloat16)
    assert fp32.emb.weight.dtype == torch.float32 and bf16.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        want, _ = fp32(ids)
        got, state = bf16(ids)
        step, _ = bf16(ids[:, :1], state=state)
    assert got.dtype == torch.bfloat16 and state.wkv[0].dtype == torch.float32
    assert rel(got, want) < 0.1 and torch.isfinite(step).all()


def check_lm_trains_and_checkpoints(model, **forward_kwargs) -> None:
    """A fresh LM: 8 AdamW steps on a repeating sequence lower the loss by > 0.5, and
    gradient checkpointing gives the same gradients. `forward_kwargs` go to every forward."""
    ids = torch.arange(33).remainder(7)[None].repeat(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        logits, _ = model(ids[:, :-1], **forward_kwargs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5
    grads = {}
    for flag in (False, True):
        model.grad_checkpoint = flag
        model.zero_grad()
        hidden, _ = model(ids, logits="hidden", **forward_kwargs)
        model.head(hidden).square().mean().backward()
        grads[flag] = [p.grad.clone() for p in model.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads[False], grads[True]))


def perturbed_vlm(model_cfg, seed: int = 0):
    """A VisualRWKV with every weight perturbed by N(0, 0.05) (RWKV's init leaves many zero
    matrices, which would hide layout mistakes), in eval mode."""
    torch.manual_seed(seed)
    model = VisualRWKV(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def build_tiny_v6():
    """VisualRWKV x060 with the tiny tower (16 tokens: 15 reversed rows + the last), middle placement."""
    torch.manual_seed(3)
    cfg = ModelSection(
        rwkv=RWKVSection(version="x060", n_layer=2, n_embd=64, head_size=32),
        vision=VisionSection(towers=["tiny"], image_size=32,
                             tiny=TinyTowerSection(width=32, depth=1, heads=2, patch_size=8)),
        projector=ProjectorSection(type="linear"), tokens_per_image=16, image_position="middle",
    )  # fmt: skip
    model = VisualRWKV(cfg).eval()
    with torch.no_grad():
        for p in model.rwkv.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for p in model.proj.parameters():
            p.normal_(0.0, 0.5)
    return model
