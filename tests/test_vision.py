"""Vision towers, names vs the released manifests, image processor, tiling."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import read_manifest
from PIL import Image

from vrwkv_core.checkpoint.formats.released_v0700 import ours_to_released, released_to_ours
from vrwkv_core.checkpoint.formats.towers import load_tower_file
from vrwkv_core.config import ModelSection, RWKVSection, TinyTowerSection, VisionSection
from vrwkv_core.errors import CheckpointError, RecipeError
from vrwkv_core.model.vision import ImageProcessor, VisionTowers
from vrwkv_core.model.vision import towers as vision
from vrwkv_core.model.vision.tiling import choose_grid, tile_image
from vrwkv_core.model.vision.towers import sam_fold

TINY_VISION = VisionSection(
    towers=["tiny"], image_size=64, tiny=TinyTowerSection(width=32, depth=2, heads=2, patch_size=8)
)


def test_sam_fold_puts_each_2x2_block_into_channels_c4_2dy_dx() -> None:
    x = torch.randn(2, 3, 8, 6)
    y = sam_fold(x)
    assert y.shape == (2, 12, 4, 3)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                torch.testing.assert_close(y[:, c * 4 + 2 * dy + dx], x[:, c, dy::2, dx::2], rtol=0, atol=0)


def test_name_maps_touch_only_the_sam_mlp() -> None:
    rel = "vit.sam_featurizer.blocks.11.mlp.lin2.bias"
    assert released_to_ours(rel) == "vit.sam_featurizer.blocks.11.mlp.fc2.bias"
    assert ours_to_released(released_to_ours(rel)) == rel
    for name in ("vit.dino_featurizer.blocks.0.mlp.fc1.weight", "vit.siglip_featurizer.attn_pool.mlp.fc1.weight",
                 "vit.sam_featurizer.neck.2.weight", "rwkv.blocks.0.ffn.key.weight"):
        assert released_to_ours(name) == name == ours_to_released(name)


@pytest.mark.parametrize("size", ["0b1", "0b4", "1b5"])
def test_meta_model_matches_released_manifest(size: str, reference_dir) -> None:
    """Every released tensor name (after the SAM map) and shape, nothing more: vit., proj. and rwkv."""
    manifest = read_manifest(reference_dir / f"visualrwkv-v0700-{size}.keys.tsv")
    n_embd = manifest["rwkv.emb.weight"][1]
    n_layer = 1 + max(int(k.split(".")[2]) for k in manifest if k.startswith("rwkv.blocks."))
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    with torch.device("meta"):
        model = VisualRWKV(ModelSection(rwkv=RWKVSection(n_layer=n_layer, n_embd=n_embd)))
    ours = {ours_to_released(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) ^ set(manifest)) == []
    assert {k: v for k, v in ours.items() if manifest[k] != v} == {}
    vit_order = [k for k in manifest if k.startswith("vit.")]
    assert [k for k in ours if k.startswith("vit.")] == vit_order
    assert model.vit.embed_dim == 3200


def test_linear_projector_is_proj_weight() -> None:
    from vrwkv_core.model.projector import build_projector

    proj = build_projector("linear", 1024, 2048)
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == {"weight": (2048, 1024)}
    with pytest.raises(RecipeError, match="projector.type"):
        build_projector("conv", 8, 8)


def test_clip_tower_needs_577_tokens_and_no_other_tower() -> None:
    with pytest.raises(RecipeError, match="clip goes alone"):
        VisionTowers(VisionSection(towers=["clip"]), 576)
    with pytest.raises(RecipeError, match="clip goes alone"):
        VisionTowers(VisionSection(towers=["clip", "tiny"]), 577)


def test_tiny_tower_pools_its_grid_to_tokens_per_image() -> None:
    torch.manual_seed(0)
    towers = VisionTowers(TINY_VISION, tokens_per_image=16)
    x = torch.randn(3, 3, 64, 64)
    grid = towers.tower_grid("tiny", x)
    assert grid.shape == (3, 32, 8, 8)
    # tiny = last block + final norm, patch tokens row-major
    model = towers.featurizer("tiny")
    ref = model.norm(model.blocks(model._pos_embed(model.patch_embed(x))))
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), ref)
    out = towers({"tiny": x})
    assert out.shape == (3, 16, 32)
    pooled = grid.view(3, 32, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 average = adaptive pool 8 -> 4
    torch.testing.assert_close(out, pooled.flatten(2).transpose(1, 2))


def test_tiny_conv_stem_replaces_the_patch_projection() -> None:
    torch.manual_seed(0)
    cfg = VisionSection(towers=["tiny"], image_size=64, tiny=TinyTowerSection(width=32, depth=1, heads=2, patch_size=8, stem="conv"))
    towers = VisionTowers(cfg, tokens_per_image=64)
    proj = towers.featurizer("tiny").patch_embed.proj
    convs = [m for m in proj if isinstance(m, torch.nn.Conv2d)]
    # 64 -> 32 -> 16 -> 8: three 3x3 stride-2 convs (3 -> 8 -> 16 -> 32 channels), then 1x1 to the width
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 8, (3, 3), (2, 2)), (8, 16, (3, 3), (2, 2)), (16, 32, (3, 3), (2, 2)), (32, 32, (1, 1), (1, 1))]
    assert towers({"tiny": torch.randn(2, 3, 64, 64)}).shape == (2, 64, 32)
    assert "tiny_featurizer.patch_embed.proj.0.weight" in towers.state_dict()
    bad = VisionSection(towers=["tiny"], image_size=60, tiny=TinyTowerSection(patch_size=6, stem="conv"))
    with pytest.raises(RecipeError, match="conv stem needs a power of 2"):
        VisionTowers(bad, tokens_per_image=16)


def test_more_tokens_than_patches_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="tokens_per_image"):
        VisionTowers(TINY_VISION, tokens_per_image=100)


def test_v0700_path_concats_dino_siglip_sam_in_order(monkeypatch) -> None:
    """The real tower kinds shrunk to width 64 and 2 blocks (SAM at 256): dino/siglip =
    blocks[:-1] output with no final norm and no class/register tokens; sam = neck output
    folded 2x2; concat in config order."""
    import dataclasses
    import functools

    import timm

    monkeypatch.setitem(vision.TOWERS, "sam", dataclasses.replace(vision.TOWERS["sam"], fixed_size=256))
    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=2, embed_dim=64, num_heads=2))
    torch.manual_seed(0)
    towers = VisionTowers(VisionSection(towers=["dino", "siglip", "sam"], image_size=112), tokens_per_image=64)
    assert towers.embed_dim == 64 + 64 + 1024
    dino, siglip, sam = (towers.featurizer(n) for n in ("dino", "siglip", "sam"))
    assert dino.num_prefix_tokens == 5 and siglip.num_prefix_tokens == 0
    images = {"dino": torch.randn(1, 3, 112, 112), "siglip": torch.randn(1, 3, 112, 112),
              "sam": torch.randn(1, 3, 256, 256)}

    def penultimate(model, x):
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks[:-1]:
            h = blk(h)
        return h[:, model.num_prefix_tokens:]  # [1, 8*8, 64]

    out = towers(images)
    assert out.shape == (1, 64, 1152)
    torch.testing.assert_close(out[..., :64], penultimate(dino, images["dino"]))
    torch.testing.assert_close(out[..., 64:128], penultimate(siglip, images["siglip"]))
    neck = sam.neck(sam.blocks(sam.patch_embed(images["sam"]) + sam.pos_embed).permute(0, 3, 1, 2))
    torch.testing.assert_close(out[..., 128:], sam_fold(neck).flatten(2).transpose(1, 2))  # [1, 64, 1024]


def test_frozen_towers_stay_in_eval_and_get_no_grads() -> None:
    towers = VisionTowers(TINY_VISION, tokens_per_image=16)
    assert towers.frozen and not any(p.requires_grad for p in towers.parameters())
    towers.train()
    assert not any(m.training for m in towers.modules() if m is not towers)
    out = towers({"tiny": torch.randn(1, 3, 64, 64)})
    assert not out.requires_grad
    towers.freeze(False)
    assert all(m.training for m in towers.modules()) and all(p.requires_grad for p in towers.parameters())
    towers({"tiny": torch.randn(1, 3, 64, 64)}).sum().backward()
    assert all(p.grad is not None for p in towers.parameters())


def test_processor_sizes_and_normalisation_on_a_constant_image() -> None:
    proc = ImageProcessor(VisionSection(towers=["dino", "siglip", "sam"], image_size=448))
    assert proc.sizes() == {"dino": 448, "siglip": 448, "sam": 1024}
    rgb = (255, 128, 0)
    out = proc(Image.new("RGB", (300, 200), rgb))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "dino": (3, 448, 448), "siglip": (3, 448, 448), "sam": (3, 1024, 1024)}
    for name, mean, std in (("dino", vision.IMAGENET_MEAN, vision.IMAGENET_STD),
                            ("sam", vision.IMAGENET_MEAN, vision.IMAGENET_STD), ("siglip", (0.5,) * 3, (0.5,) * 3)):
        for c in range(3):
            want = (rgb[c] / 255 - mean[c]) / std[c]
            torch.testing.assert_close(out[name][c], torch.full((448 if name != "sam" else 1024,) * 2, want))
    assert out["siglip"][0, 0, 0].item() == pytest.approx(1.0) and out["siglip"][2, 0, 0].item() == pytest.approx(-1.0)


def test_processor_converts_to_rgb_and_shares_equal_transforms() -> None:
    proc = ImageProcessor(VisionSection(towers=["siglip", "tiny"], image_size=64))
    out = proc(Image.new("L", (10, 30), 255))
    assert out["tiny"].shape == (3, 64, 64)
    assert out["tiny"] is out["siglip"]
    torch.testing.assert_close(out["tiny"], torch.ones(3, 64, 64))
    batch = proc.batch([Image.new("RGBA", (5, 5)), Image.new("RGB", (9, 4))])
    assert batch["tiny"].shape == (2, 3, 64, 64)
    assert proc.batch([])["tiny"].shape == (0, 3, 64, 64)


@pytest.mark.parametrize(
    ("size", "grid"),
    [((1000, 1000), (2, 2)), ((800, 1600), (1, 2)), ((1600, 800), (2, 1)), ((600, 1800), (1, 3)),
     ((3000, 900), (3, 1)), ((1300, 1000), (2, 1)), ((1000, 1300), (1, 2)), ((1000, 1600), (1, 2))],
)
def test_tiling_picks_the_grid_wasting_least_area(size, grid) -> None:
    # 1300x1000 in 896x448: scale 0.448 -> 582x448, wasted 140672 < 896x896's 185472
    assert choose_grid(*size) == grid


def test_tile_image_gives_global_view_then_row_major_tiles() -> None:
    img = Image.new("RGB", (1344, 448), (255, 0, 0))
    img.paste((0, 255, 0), (448, 0, 896, 448))
    img.paste((0, 0, 255), (896, 0, 1344, 448))
    views = tile_image(img, 448)
    assert len(views) == 4 and views[0].size == (1344, 448)
    assert [v.size for v in views[1:]] == [(448, 448)] * 3
    assert [v.getpixel((224, 224)) for v in views[1:]] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    # a 2x2 grid at image_size 224: the grid scales with the tower size
    quad = tile_image(Image.new("RGB", (500, 480)), 224)
    assert len(quad) == 5 and {v.size for v in quad[1:]} == {(250, 240)}  # crops of the original pixels
    assert len(tile_image(Image.new("RGB", (800, 800)), 448)) == 1  # 2x2 grid and <= 896*896 pixels
    assert len(tile_image(Image.new("RGB", (300, 448)), 448)) == 3  # the original tiles it 1x2
    proc = ImageProcessor(VisionSection(towers=["tiny"], image_size=64, tiling=True))
    assert len(proc.views(Image.new("RGB", (128, 64)))) == 3
    assert len(ImageProcessor(TINY_VISION).views(Image.new("RGB", (128, 64)))) == 1


def test_load_tower_file_round_trip_and_errors(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = VisionTowers(TINY_VISION, tokens_per_image=16)
    sd = src.featurizer("tiny").state_dict()
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    dst = VisionTowers(TINY_VISION, tokens_per_image=16)
    load_tower_file(dst, "tiny", tmp_path / "tiny.safetensors")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dst({"tiny": x}), src({"tiny": x}), rtol=0, atol=0)
    save_file({k: v for k, v in sd.items() if "blocks.1." not in k}, str(tmp_path / "part.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_tower_file(dst, "tiny", tmp_path / "part.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_tower_file(dst, "tiny", tmp_path / "nope.pth")


@pytest.mark.slow
def test_full_v0700_towers_encode_one_image_on_cpu(tiny_image) -> None:
    """The real tower set (random weights, ~0.8B params) encodes one image: [1, 1024, n_embd]."""
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    torch.manual_seed(0)
    model = VisualRWKV(ModelSection(rwkv=RWKVSection(n_layer=1, n_embd=64, vocab_size=256)))
    images = model.image_processor.batch([tiny_image])
    assert {k: tuple(v.shape) for k, v in images.items()} == {
        "dino": (1, 3, 448, 448), "siglip": (1, 3, 448, 448), "sam": (1, 3, 1024, 1024)}
    t0 = time.perf_counter()
    feats = model.encode_images(images)
    elapsed = time.perf_counter() - t0
    assert feats.shape == (1, 1024, 64) and torch.isfinite(feats).all()
    print(f"full v7.00 towers: {elapsed:.1f} s per image on CPU (fp32, {torch.get_num_threads()} threads)")
