"""model/vision/clip.py: the CLIP ViT-L/14-336 tower of v6.0 (features, transform, patch spans)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F



from vrwkv_core.checkpoint.formats.towers import clip_from_transformers, clip_to_transformers
from vrwkv_core.model.vision.clip import (
    CLIP_MEAN,
    CLIP_STD,
    build_clip_tower,
    clip_features,
    clip_patch_spans,
    clip_preprocess,
)


def _transformers_clip_reference(hf: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """CLIPVisionModel's last_hidden_state, written from its equations and its own tensor names."""
    p = {k[len("vision_model."):]: t for k, t in hf.items()}
    w = p["embeddings.patch_embedding.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = p["embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat((cls, x), 1) + p["embeddings.position_embedding.weight"]
    D = x.shape[-1]

    def ln(x, name):
        return F.layer_norm(x, (D,), p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)

    def lin(x, name):
        return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])

    x = ln(x, "pre_layrnorm")
    i = 0
    while f"encoder.layers.{i}.layer_norm1.weight" in p:
        L = f"encoder.layers.{i}"
        h = ln(x, f"{L}.layer_norm1")
        B, T, _ = h.shape
        q, k, v = (lin(h, f"{L}.self_attn.{n}_proj").view(B, T, heads, -1).transpose(1, 2) for n in "qkv")
        att = torch.softmax((q * (D // heads) ** -0.5) @ k.transpose(-1, -2), dim=-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, D), f"{L}.self_attn.out_proj")
        h = lin(ln(x, f"{L}.layer_norm2"), f"{L}.mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), f"{L}.mlp.fc2")  # quick_gelu
        i += 1
    return x  # no post_layernorm: last_hidden_state

def test_clip_features_compute_clips_function() -> None:
    """timm's tower under the key map = CLIPVisionModel's math, with the CLS row moved last."""
    torch.manual_seed(0)
    tower = build_clip_tower(img_size=56, embed_dim=64, depth=2, num_heads=4).eval()
    hf = clip_to_transformers(tower.state_dict())
    hf = {k: torch.randn_like(t) * (0.02 if t.dim() > 1 else 0.3) for k, t in hf.items()}
    tower.load_state_dict(clip_from_transformers(hf))
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got = clip_features(tower, pixels)
        want = _transformers_clip_reference(hf, pixels, heads=4)
    assert got.shape == (2, 17, 64)
    assert torch.allclose(got[:, :16], want[:, 1:], atol=1e-5) and torch.allclose(got[:, 16], want[:, 0], atol=1e-5)

def test_clip_preprocess_resizes_the_short_side_and_crops_the_centre() -> None:
    from PIL import Image, ImageDraw

    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    flat = clip_preprocess(Image.new("RGB", (50, 80), (255, 0, 51)))
    assert flat.shape == (3, 336, 336)
    assert torch.allclose(flat, (torch.tensor([1.0, 0.0, 0.2]).view(3, 1, 1) - mean) / std, atol=1e-6)
    # 1000 x 400, left half black, right half white, 100-px red bars at both ends: the scale
    # is 336/400, the crop keeps the middle 336 of 840 columns, so no red and the edge sits mid-crop
    img = Image.new("RGB", (1000, 400), "black")
    draw = ImageDraw.Draw(img)
    draw.rectangle([500, 0, 999, 399], fill="white")
    draw.rectangle([0, 0, 99, 399], fill="red")
    draw.rectangle([900, 0, 999, 399], fill="red")
    x = clip_preprocess(img) * std + mean  # back to [0, 1]
    assert x.shape == (3, 336, 336)
    assert float((x[0] - x[1]).abs().max()) < 0.02  # grey levels only: the red bars are cropped away
    assert float(x[:, :, :160].max()) < 0.02 and float(x[:, :, 176:].min()) > 0.98
    tall = clip_preprocess(Image.new("L", (336, 700), 128))  # grey input -> RGB, no resize of the width
    assert tall.shape == (3, 336, 336)

def test_clip_patch_spans() -> None:
    P = 65535
    ids = torch.tensor([[1, 2] + [P] * 577 + [3] * 578, [P] * 577 + [P] * 577 + [4, 5, 6]])
    assert clip_patch_spans(ids, P) == [[(2, 578)], [(0, 576), (577, 1153)]]
    assert clip_patch_spans(torch.tensor([1, 2, 3]), P) == [[]]
    with pytest.raises(ValueError, match="not a multiple of 577"):
        clip_patch_spans(torch.tensor([[1] + [P] * 576]), P)
