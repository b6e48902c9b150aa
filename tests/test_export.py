"""`vrwkv export`: our folder -> the released .pth layout and the RWKV-LM layout (checked with
the `rwkv` package), dtypes, errors; and a real SAM tower going file -> model -> export -> back."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import perturbed_vlm

from vrwkv_cli.main import run
from vrwkv_core.checkpoint.build import build_from_parts
from vrwkv_core.checkpoint.formats.released_v0700 import ours_to_released
from vrwkv_core.checkpoint.load import load_released, load_visual_rwkv
from vrwkv_core.checkpoint.ours import WEIGHTS, save_pretrained
from vrwkv_core.checkpoint.tensors import read_pth
from vrwkv_core.config import load_recipe
from vrwkv_core.model.visual_rwkv import VisualRWKV

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory) -> tuple[VisualRWKV, Path]:
    """The tiny model (every weight perturbed: RWKV's init leaves many zero matrices) and its folder."""
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    model = perturbed_vlm(recipe.model, seed=0)
    out = tmp_path_factory.mktemp("export") / "model"
    save_pretrained(model, out, recipe)
    return model, out


def test_export_writes_the_released_layout_in_fp16(model_and_dir, tmp_path, capsys) -> None:
    model, model_dir = model_and_dir
    out = tmp_path / "exported" / "tiny.pth"
    assert run(["export", str(model_dir), "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "released VisualRWKV layout" in printed and "float16" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.pth"]  # no temp file left
    sd = read_pth(out)
    ours = model.state_dict()
    assert list(sd) == [ours_to_released(k) for k in ours]
    for name, t in ours.items():
        assert sd[ours_to_released(name)].dtype == torch.float16
        assert torch.equal(sd[ours_to_released(name)], t.half()), name
    back, _ = load_released(out, model_cfg=model.config, dtype=torch.float16)
    assert all(torch.equal(back.state_dict()[k], t.half()) for k, t in ours.items())


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_export_dtypes(model_and_dir, tmp_path, dtype, torch_dtype) -> None:
    model, model_dir = model_and_dir
    assert run(["export", str(model_dir), "--out", str(tmp_path / "m.pth"), "--dtype", dtype]) == 0
    sd = read_pth(tmp_path / "m.pth")
    for name, t in model.state_dict().items():
        assert torch.equal(sd[ours_to_released(name)], t.to(torch_dtype)), name


_RWKV_PKG = textwrap.dedent(
    """
    import os, sys, json
    os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    import torch
    from rwkv.model import RWKV
    path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = RWKV(model=path[: -len(".pth")], strategy="cpu fp32")
    logits, _ = model.forward(ids, None, full_output=True)
    torch.save(logits.float(), out)
    """
)


def test_lm_only_export_loads_in_the_rwkv_package_with_our_logits(model_and_dir, tmp_path) -> None:
    model, model_dir = model_and_dir
    out = tmp_path / "tiny-lm.pth"
    assert run(["export", str(model_dir), "--out", str(out), "--lm-only", "--dtype", "fp32"]) == 0
    sd = read_pth(out)
    assert set(sd) == {k[len("rwkv."):] for k in model.state_dict() if k.startswith("rwkv.")}
    ids = [33, 4000, 12, 65000, 261, 0, 17]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-c", _RWKV_PKG, str(out), json.dumps(ids), str(tmp_path / "logits.pt")],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    theirs = torch.load(tmp_path / "logits.pt", weights_only=True)
    with torch.no_grad():
        ours = model.rwkv(torch.tensor([ids]))[0][0]
    assert ours.shape == theirs.shape == (len(ids), 65536)
    rel = float((ours - theirs).abs().max() / theirs.std())
    print(f"rwkv package vs ours: max|diff|/std = {rel:.2e}")
    assert rel <= 1e-3


def test_export_errors_are_one_line(tmp_path, capsys) -> None:
    assert run(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pth")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "config.yaml: not found" in err[0]
    assert run(["export", str(tmp_path), "--out", str(tmp_path / "x.pth"), "--dtype", "fp8"]) == 2
    assert "fp8" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def _manifest(path: Path) -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in path.read_text().splitlines())
    return {name: tuple(ast.literal_eval(shape)) for name, shape, _ in rows}


@pytest.mark.slow
def test_sam_tower_file_to_model_to_released_export_and_back(reference_dir, tmp_path, tiny_recipe) -> None:
    """A SAM ViT-B file in Meta's layout (`image_encoder.*`, `mlp.lin1`) goes through timm's
    filter into a new model, is exported with the released SAM names and shapes, and loads back."""
    manifest = _manifest(reference_dir / "visualrwkv-v0700-0b1.keys.tsv")
    sam = {k: v for k, v in manifest.items() if k.startswith("vit.sam_featurizer.")}
    g = torch.Generator().manual_seed(0)
    meta_file = {k.replace("vit.sam_featurizer.", "image_encoder."): torch.randn(s, generator=g).half() * 0.02
                 for k, s in sam.items()}  # fmt: skip
    torch.save(meta_file, tmp_path / "sam_vit_b.pth")
    torch.manual_seed(0)
    from vrwkv_core.model.rwkv.rwkv7 import RWKV7

    torch.save(RWKV7(tiny_recipe.model.rwkv).state_dict(), tmp_path / "lm.pth")
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [
        f"model.rwkv.checkpoint={tmp_path / 'lm.pth'}", f"model.vision.checkpoints.sam={tmp_path / 'sam_vit_b.pth'}",
        "model.vision.towers=[sam]", "model.tokens_per_image=1024", "model.vision.image_size=448",
    ])  # fmt: skip
    model = build_from_parts(recipe)
    ours = model.state_dict()
    assert torch.equal(ours["vit.sam_featurizer.blocks.4.mlp.fc2.weight"],
                       meta_file["image_encoder.blocks.4.mlp.lin2.weight"].float())  # fmt: skip
    save_pretrained(model, tmp_path / "model", recipe)
    assert run(["export", str(tmp_path / "model"), "--out", str(tmp_path / "sam.pth")]) == 0
    sd = read_pth(tmp_path / "sam.pth")
    assert {k: tuple(t.shape) for k, t in sd.items() if k.startswith("vit.")} == sam
    back = load_visual_rwkv(tmp_path / "sam.pth")
    assert back.config.vision.towers == ["sam"] and back.config.tokens_per_image == 1024
    for name, t in ours.items():
        assert torch.equal(back.state_dict()[name], t.half().float()), name
    assert (tmp_path / "model" / WEIGHTS).is_file()
