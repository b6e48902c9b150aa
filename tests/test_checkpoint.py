"""Checkpoints: our folder format, released v7.00 files (strict, meta-checked layouts, a real-sized
0b1 file), building from an RWKV-7 World .pth, and refusing bad files with one clear line."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import pickle
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import perturbed_vlm, read_manifest

from vrwkv_core.checkpoint.build import _to_empty, build_from_parts, build_meta
from vrwkv_core.checkpoint.formats.released_v0700 import ours_to_released, released_to_ours
from vrwkv_core.checkpoint.load import from_released_state_dict, load_checkpoint, load_pretrained, load_visual_rwkv
from vrwkv_core.checkpoint.ours import WEIGHTS, save_pretrained
from vrwkv_core.checkpoint.tensors import read_pth
from vrwkv_core.config import load_recipe
from vrwkv_core.errors import CheckpointError
from vrwkv_core.fsutil import FILE_MODE
from vrwkv_core.model.rwkv.rwkv7 import RWKV7, LoraDims
from vrwkv_core.model.vision import towers as vision
from vrwkv_core.model.visual_rwkv import IMAGE_TOKEN_ID, VisualRWKV

REPO = Path(__file__).resolve().parents[1]
SIZES = ("0b1", "0b4", "1b5")


def meta_state_dict(manifest: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {n: torch.empty(s, dtype=torch.float16, device="meta") for n, s in manifest.items()}


_BUILT: dict[int, VisualRWKV] = {}


def tiny_model(recipe, seed: int = 0) -> VisualRWKV:
    """`perturbed_vlm` of the recipe's model, built once per seed (a fresh copy each call)."""
    if seed not in _BUILT:
        _BUILT[seed] = perturbed_vlm(recipe.model, seed)
    return copy.deepcopy(_BUILT[seed])


def prompt(model: VisualRWKV, image) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.tensor([[IMAGE_TOKEN_ID] * model.tokens_per_image + [3, 4, 5, 261]])
    return ids, model.image_processor.batch([image])


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    out = tmp_path_factory.mktemp("saved") / "model"
    save_pretrained(tiny_model(recipe), out, recipe)
    return out


@pytest.fixture
def tiny_dir(saved_tiny, tmp_path) -> Path:
    """A fresh copy of the saved tiny model folder (tests may damage it)."""
    return Path(shutil.copytree(saved_tiny, tmp_path / "model"))


# --- our format ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_folder_round_trips_bit_exactly(tiny_recipe, tmp_path, tiny_image, dtype) -> None:
    model = tiny_model(tiny_recipe).to(dtype)
    save_pretrained(model, tmp_path / "m", tiny_recipe)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.yaml", WEIGHTS]
    back = load_visual_rwkv(tmp_path / "m")
    ours, theirs = model.state_dict(), back.state_dict()
    assert list(ours) == list(theirs)
    for name, t in ours.items():
        assert theirs[name].dtype == t.dtype and torch.equal(theirs[name], t), name
    ids, images = prompt(model, tiny_image)
    with torch.no_grad():
        assert torch.equal(model.prefill(ids, images)[0], back.prefill(ids, images)[0])
    _, recipe = load_pretrained(tmp_path / "m")
    assert recipe == tiny_recipe


def test_lone_model_safetensors_loads_from_its_metadata(tiny_dir) -> None:
    model, recipe = load_checkpoint(tiny_dir / WEIGHTS)
    ref, _ = load_pretrained(tiny_dir)
    assert recipe.model == ref.config
    for name, t in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


def test_non_default_lora_widths_round_trip(tiny_recipe, tmp_path) -> None:
    model = tiny_model(tiny_recipe)
    lora = LoraDims(decay=32, aaa=96, mv=64, gate=32)
    torch.manual_seed(1)
    model.rwkv = RWKV7(tiny_recipe.model.rwkv, lora)
    save_pretrained(model, tmp_path / "m", tiny_recipe)
    back = load_visual_rwkv(tmp_path / "m")
    assert back.rwkv.lora == lora
    assert torch.equal(back.rwkv.blocks[1].att.a1, model.rwkv.blocks[1].att.a1)


def test_saving_is_atomic(tiny_recipe, tmp_path, monkeypatch) -> None:
    first = tiny_model(tiny_recipe, seed=0)
    save_pretrained(first, tmp_path / "m", tiny_recipe)
    for name in ("config.yaml", WEIGHTS):  # the usual mode (safetensors alone writes 0600)
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == FILE_MODE
    from vrwkv_core.checkpoint import ours

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ours, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny_model(tiny_recipe, seed=1), tmp_path / "m", tiny_recipe)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.yaml", WEIGHTS]  # no temp left
    back = load_visual_rwkv(tmp_path / "m")
    assert torch.equal(back.proj.gate.weight, first.proj.gate.weight)


def test_non_persistent_buffers_are_computed_not_left_on_meta(tiny_recipe, tmp_path, monkeypatch) -> None:
    spec = vision.TOWERS["tiny"]

    def with_table(cfg, size):  # a tower with a non-persistent table, like timm's rope caches
        model = spec.build(cfg, size)
        model.register_buffer("table", torch.arange(6.0).view(2, 3) * 0.5, persistent=False)
        return model

    monkeypatch.setitem(vision.TOWERS, "tiny", dataclasses.replace(spec, build=with_table))
    save_pretrained(tiny_model(tiny_recipe), tmp_path / "m", tiny_recipe)
    back = load_visual_rwkv(tmp_path / "m", dtype=torch.bfloat16)
    table = back.vit.tiny_featurizer.table
    assert not table.is_meta and table.dtype == torch.bfloat16
    assert torch.equal(table.float(), torch.arange(6.0).view(2, 3) * 0.5)
    assert not any(t.is_meta for t in (*back.parameters(), *back.buffers()))
    fresh = build_meta(tiny_recipe.model)  # a tower about to be filled from its own file
    _to_empty(fresh.vit.tiny_featurizer)
    assert fresh.vit.tiny_featurizer.table.is_meta and not fresh.vit.tiny_featurizer.pos_embed.is_meta


# --- released v7.00 files -----------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_released_layout_matches_manifest_on_meta(reference_dir, size) -> None:
    manifest = read_manifest(reference_dir / f"visualrwkv-v0700-{size}.keys.tsv")
    model = from_released_state_dict(meta_state_dict(manifest), size, device="meta")
    cfg = model.config
    dims = {"0b1": (12, 768), "0b4": (24, 1024), "1b5": (24, 2048)}[size]
    assert (cfg.rwkv.n_layer, cfg.rwkv.n_embd, cfg.rwkv.vocab_size) == (*dims, 65536)
    assert cfg.vision.towers == ["dino", "siglip", "sam"] and cfg.vision.image_size == 448
    assert cfg.projector.type == "mlp" and cfg.tokens_per_image == 1024
    got = {ours_to_released(k): tuple(t.shape) for k, t in model.state_dict().items()}
    assert got == manifest


def test_released_key_accounting_names_missing_unexpected_and_wrong_shapes(reference_dir) -> None:
    sd = meta_state_dict(read_manifest(reference_dir / "visualrwkv-v0700-0b1.keys.tsv"))
    for name in ("vit.sam_featurizer.blocks.2.mlp.lin1.weight", "rwkv.blocks.3.att.k_k", "proj.ln_v.bias"):
        del sd[name]
    sd["vit.dino_featurizer.head.weight"] = torch.empty(1000, 1024, device="meta")
    sd["rwkv.blocks.0.att.x_r"] = torch.empty(1, 1, 7, device="meta")
    with pytest.raises(CheckpointError) as err:
        from_released_state_dict(sd, "bad.pth", device="meta")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("bad.pth: weights do not fit the model")
    assert "3 missing" in msg and "vit.sam_featurizer.blocks.2.mlp.lin1.weight" in msg and "proj.ln_v.bias" in msg
    assert "1 unexpected: vit.dino_featurizer.head.weight" in msg
    assert "1 wrong shape: rwkv.blocks.0.att.x_r (1, 1, 7) != (1, 1, 768)" in msg


def test_released_projector_type_and_towers_are_inferred(reference_dir) -> None:
    sd = meta_state_dict(read_manifest(reference_dir / "visualrwkv-v0700-0b1.keys.tsv"))
    sd = {k: t for k, t in sd.items() if not k.startswith(("proj.", "vit.siglip", "vit.dino"))}
    sd["proj.weight"] = torch.empty(768, 1024, device="meta")
    model = from_released_state_dict(sd, "sam-linear.pth", device="meta")
    assert model.config.vision.towers == ["sam"] and model.config.projector.type == "linear"


def _fill_like_released(manifest: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Random fp16 tensors for every manifest entry, fast: slices of one shared random pool."""
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 23, generator=g) * 0.02).half()
    sd = {}
    for name, shape in manifest.items():
        n = math.prod(shape)
        if n <= pool.numel():
            off = int(torch.randint(pool.numel() - n + 1, (1,), generator=g))
            sd[name] = pool[off:off + n].clone().view(shape)
        else:
            sd[name] = pool.repeat(-(-n // pool.numel()))[:n].view(shape).clone()
    return sd


@pytest.mark.slow
def test_real_sized_0b1_file_loads_strictly_and_answers_an_image(reference_dir, tmp_path, record_property) -> None:
    from PIL import Image

    manifest = read_manifest(reference_dir / "visualrwkv-v0700-0b1.keys.tsv")
    sd = _fill_like_released(manifest)
    assert 1.0e9 < sum(t.numel() for t in sd.values()) < 1.1e9
    checks = ("vit.sam_featurizer.blocks.3.mlp.lin1.weight", "rwkv.blocks.5.att.w0", "proj.gate.weight",
              "vit.dino_featurizer.pos_embed")  # fmt: skip
    expected = {k: sd[k].clone() for k in checks}
    path = tmp_path / "VisualRWKV-v0700-0B1-random.pth"
    torch.save(sd, path)
    del sd
    gc.collect()

    t0 = time.perf_counter()
    model = load_visual_rwkv(path)
    load_s = time.perf_counter() - t0
    got = model.state_dict()
    for name in checks:
        assert torch.equal(got[released_to_ours(name)], expected[name].float()), name
    assert got["rwkv.emb.weight"].dtype == torch.float32
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))

    image = Image.new("RGB", (320, 240), "white")
    ids, images = prompt(model, image)
    t0 = time.perf_counter()
    logits, state = model.prefill(ids, images)
    forward_s = time.perf_counter() - t0
    assert logits.shape == (1, 65536) and bool(torch.isfinite(logits).all()) and float(logits.std()) > 0
    record_property("load_s", round(load_s, 2))
    record_property("forward_s", round(forward_s, 2))
    print(f"real-sized 0b1: load {load_s:.1f}s, forward (1 image + 4 tokens) {forward_s:.1f}s")


# --- building from an RWKV-7 World .pth -----------------------------------------------------


def _world_pth(tmp_path: Path, recipe, vocab: int | None = None) -> Path:
    torch.manual_seed(3)
    cfg = recipe.model.rwkv
    lm = RWKV7(cfg if vocab is None else replace(cfg, vocab_size=vocab))
    path = tmp_path / "RWKV-x070-World-tiny.pth"
    torch.save({k: t.half() for k, t in lm.state_dict().items()}, path)
    return path


def test_build_from_parts_takes_the_lm_from_a_world_pth(tiny_recipe, tmp_path, tiny_image) -> None:
    path = _world_pth(tmp_path, tiny_recipe)
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"model.rwkv.checkpoint={path}"])
    model = build_from_parts(recipe)
    lm = read_pth(path)
    for name, t in model.rwkv.state_dict().items():
        assert t.dtype == torch.float32 and torch.equal(t, lm[name].float()), name
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert float(model.proj.gate.weight.detach().std()) > 0  # freshly initialised, not empty memory
    ids, images = prompt(model, tiny_image)
    assert torch.isfinite(model.prefill(ids, images)[0]).all()


def test_build_from_parts_refuses_a_checkpoint_of_other_dims(tiny_recipe, tmp_path) -> None:
    path = _world_pth(tmp_path, tiny_recipe)
    n = tiny_recipe.model.rwkv.n_layer
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"model.rwkv.checkpoint={path}", f"model.rwkv.n_layer={n + 1}"])
    with pytest.raises(CheckpointError, match=rf"has n_layer {n}, but the recipe's model.rwkv.n_layer is {n + 1}"):
        build_from_parts(recipe)


# --- refusing bad files ---------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["zip", "pickle2", "pickle4"])
def test_pickled_code_is_never_run(tmp_path, how) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    if how == "zip":
        torch.save({"rwkv.emb.weight": torch.zeros(2, 2), "x": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=int(how[-1])))
    with pytest.raises(CheckpointError) as err:
        load_visual_rwkv(path)
    assert not marker.exists()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "nothing in it was run" in msg
    if how != "pickle4":  # protocol 4 frames are refused before the GLOBAL is even read
        assert f"refused: the file holds a pickled Python object ({os.system.__module__}.system)" in msg


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("random.pth", os.urandom(4096).replace(b"\x80", b"\x00"), "not a PyTorch checkpoint"),
        ("notes.pth", b"hello\nthis is text, not weights\n", "not a PyTorch checkpoint"),
        ("empty.pth", b"", "empty file"),
        ("random.safetensors", os.urandom(4096), "truncated or not a safetensors file"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, name, content, expected) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_visual_rwkv(path)
    assert "\n" not in str(err.value)


def test_truncated_files(tiny_dir, tmp_path) -> None:
    data = (tiny_dir / WEIGHTS).read_bytes()
    (tiny_dir / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated or not a safetensors file"):
        load_visual_rwkv(tiny_dir)
    torch.save({"w": torch.zeros(10000)}, tmp_path / "t.pth")
    data = (tmp_path / "t.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t.pth: truncated or corrupt PyTorch checkpoint"):
        load_visual_rwkv(tmp_path / "t.pth")


def test_a_checkpoint_for_another_vocab_size(tiny_recipe, tmp_path) -> None:
    sd = {ours_to_released(k): t.half() for k, t in tiny_model(tiny_recipe).state_dict().items()}
    sd["rwkv.emb.weight"] = torch.zeros(50277, 128, dtype=torch.float16)
    sd["rwkv.head.weight"] = torch.zeros(50277, 128, dtype=torch.float16)
    torch.save(sd, tmp_path / "pile.pth")
    with pytest.raises(CheckpointError, match=r"pile.pth: vocab size 50277, the World tokenizer needs 65536$"):
        load_visual_rwkv(tmp_path / "pile.pth")
    path = _world_pth(tmp_path, tiny_recipe, vocab=50277)
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"model.rwkv.checkpoint={path}"])
    with pytest.raises(CheckpointError, match=r"vocab size 50277, the World tokenizer needs 65536$"):
        build_from_parts(recipe)


def test_folders_and_files_that_are_not_models(tiny_dir, tiny_recipe, tmp_path) -> None:
    (tiny_dir / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors; not a vrwkv model folder"):
        load_visual_rwkv(tiny_dir)
    with pytest.raises(CheckpointError, match=r"no such file or folder"):
        load_visual_rwkv(tmp_path / "nowhere.pth")
    path = _world_pth(tmp_path, tiny_recipe)
    with pytest.raises(CheckpointError, match=r"an RWKV-7 language model, not a VisualRWKV checkpoint") as err:
        load_visual_rwkv(path)
    assert "RWKV7.from_checkpoint" in err.value.hint
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"holds a list, not a state dict of tensors"):
        load_visual_rwkv(tmp_path / "list.pth")
