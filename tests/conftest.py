"""Shared fixtures: tiny configs, tiny PIL images, the real LLaVA sample, GPU skipping (plain helper
functions are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAVA_SAMPLE = SHARED / "testdata" / "llava-textvqa-sample"
REFERENCE = SHARED / "reference"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the internet

from helpers import build_tiny_v6, build_tiny_vlm  # noqa: E402  (after the offline switch)


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


@pytest.fixture(scope="module")
def tiny_vlm():
    """`build_tiny_vlm()`, built once per test module."""
    return build_tiny_vlm()


@pytest.fixture(scope="module")
def tiny_v6():
    return build_tiny_v6()

@pytest.fixture(scope="module")
def v6_dir(tmp_path_factory) -> Path:
    """The tiny v6.0 model saved as a training stage writes it (config.yaml + model.safetensors)."""
    from dataclasses import replace

    from PIL import Image

    from vrwkv_core.checkpoint import save_pretrained
    from vrwkv_core.config import load_recipe

    out = tmp_path_factory.mktemp("v6model")
    vlm = build_tiny_v6()
    save_pretrained(vlm, out, replace(load_recipe(REPO / "recipes" / "tiny.yaml"), model=vlm.config))
    Image.new("RGB", (40, 30), "red").save(out / "red.png")
    return out
