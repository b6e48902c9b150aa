"""Shared fixtures: tiny configs, tiny PIL images, the real LLaVA sample, GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAVA_SAMPLE = SHARED / "testdata" / "llava-textvqa-sample"
REFERENCE = SHARED / "reference"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the internet


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips `gpu` tests cleanly when CUDA is absent."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llava_sample() -> Path:
    """The real 1,000-record LLaVA sample (read-only; copy before modifying)."""
    if not (LLAVA_SAMPLE / "data.json").is_file():
        pytest.skip(f"LLaVA sample not found at {LLAVA_SAMPLE}")
    return LLAVA_SAMPLE


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference manifests (tensor names and shapes of released files)."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference folder not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled World tokenizer (built once per session)."""
    from vrwkv_core.tokenizer import default_tokenizer

    return default_tokenizer()


@pytest.fixture
def tiny_image():
    """A 64x64 RGB PIL image with a red square on white."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).rectangle([16, 16, 47, 47], fill=(220, 30, 30))
    return img


@pytest.fixture
def tiny_recipe():
    """The tiny recipe with short stages, as a Recipe object."""
    from vrwkv_core.config import load_recipe

    return load_recipe(REPO / "recipes" / "tiny.yaml", ["pretrain.max_steps=4", "finetune.max_steps=4"])


@pytest.fixture
def nan_poison():
    """Every uninitialised allocation is NaN for the duration of a test (kernel tests use it
    with `pytestmark = pytest.mark.usefixtures("nan_poison")`: unwritten outputs show up)."""
    import torch

    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """One tiny model trained briefly through both stages, shared by every test that needs one.

    Returns a dict with the run folder, the recipe overrides, and the stage out_dirs. The
    model is barely trained (a few steps): tests use it for mechanics, not accuracy.
    """
    from vrwkv_core.config import load_recipe
    from vrwkv_core.data.shapes import prepare_shapes
    from vrwkv_core.train import run_stage

    root = tmp_path_factory.mktemp("tiny_run")
    data = prepare_shapes(root / "shapes", n_train=120, n_eval=24, seed=1)
    overrides = [
        f"data.root={data}",
        "data.val_fraction=0.1",
        f"pretrain.out_dir={root / 'pretrain'}",
        "pretrain.max_steps=6",
        "pretrain.micro_batch=8",
        "pretrain.save_every_steps=3",
        "pretrain.val_every_steps=3",
        "pretrain.warmup_steps=2",
        f"finetune.out_dir={root / 'finetune'}",
        f"finetune.init_from={root / 'pretrain'}",
        "finetune.max_steps=6",
        "finetune.micro_batch=8",
        "finetune.save_every_steps=3",
        "finetune.val_every_steps=3",
        "finetune.warmup_steps=2",
    ]
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", overrides)
    run_stage(recipe, "pretrain")
    run_stage(recipe, "finetune")
    return {"root": root, "data": data, "overrides": overrides, "recipe": recipe,
            "pretrain": root / "pretrain", "finetune": root / "finetune"}  # fmt: skip


# Helpers shared by several test files (import them: `from conftest import build_tiny_vlm`).


def rel(x, ref) -> float:
    """max|x - ref| / std(ref), the logits tolerance of DESIGN.md."""
    return float((x.float() - ref.float()).abs().max() / ref.float().std())


def read_manifest(path: Path) -> dict[str, tuple[int, ...]]:
    """A reference manifest (name, shape, dtype per tab-separated line) -> {name: shape}."""
    import ast

    out = {}
    for line in path.read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        out[name] = tuple(ast.literal_eval(shape))
    return out


def build_tiny_vlm(seed: int = 1, tokens_per_image: int = 4, model=None):
    """A VisualRWKV on non-degenerate random weights (eval mode): `model` (a ModelSection;
    default the `tiny` tower and a 2-layer RWKV-7), its LM from `random_rwkv7_weights`
    and a projector with visible output, so images change the answer."""
    import torch

    from vrwkv_core.bench.lm import random_rwkv7_weights
    from vrwkv_core.config import ModelSection, RWKVSection, TinyTowerSection, VisionSection
    from vrwkv_core.model.visual_rwkv import VisualRWKV

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
    import torch

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
    import torch

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
    import torch

    from vrwkv_core.model.visual_rwkv import VisualRWKV

    torch.manual_seed(seed)
    model = VisualRWKV(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_vlm():
    """`build_tiny_vlm()`, built once per test module."""
    return build_tiny_vlm()
