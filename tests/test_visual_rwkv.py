"""VisualRWKV: image-token splicing, mixed image counts, training step, prefill, dtypes."""

from __future__ import annotations

import copy

import pytest
from helpers import build_tiny_v6
import torch

from vrwkv_core.config import ModelSection, RWKVSection, TinyTowerSection, VisionSection
from vrwkv_core.errors import DataError
from vrwkv_core.model.visual_rwkv import IMAGE_TOKEN_ID, VisualRWKV, splice_image_features

P = 16  # tokens_per_image of the tiny config


def tiny_cfg(freeze: bool = True, projector: str = "mlp") -> ModelSection:
    from vrwkv_core.config import ProjectorSection

    return ModelSection(
        rwkv=RWKVSection(n_layer=2, n_embd=64, head_size=16, vocab_size=256),
        vision=VisionSection(towers=["tiny"], image_size=64, freeze=freeze,
                             tiny=TinyTowerSection(width=32, depth=2, heads=2, patch_size=8)),
        projector=ProjectorSection(type=projector),
        tokens_per_image=P,
    )


def build(**kw) -> VisualRWKV:
    torch.manual_seed(0)
    model = VisualRWKV(tiny_cfg(**kw))
    with torch.no_grad():  # RWKV-7 init starts every block as the identity: give them some weight
        for name, p in model.rwkv.named_parameters():
            if name.endswith(("output.weight", "ffn.value.weight")):
                p.normal_(0, 0.05)
        model.rwkv.emb.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def base_model() -> VisualRWKV:
    return build()


@pytest.fixture
def model(base_model: VisualRWKV) -> VisualRWKV:
    """A fresh copy of the tiny model (frozen tower, mlp projector) for each test."""
    return copy.deepcopy(base_model)


def batch_ids(layout: list[list[tuple[str, int]]], length: int = 48) -> torch.Tensor:
    """Builds ids from [(kind, n)] runs per sample: ("t", n) text ids, ("i", k) k images; pads with 0."""
    rows = []
    g = torch.Generator().manual_seed(5)
    for runs in layout:
        row = []
        for kind, n in runs:
            row += [IMAGE_TOKEN_ID] * (n * P) if kind == "i" else torch.randint(1, 256, (n,), generator=g).tolist()
        rows.append(row + [0] * (length - len(row)))
    return torch.tensor(rows)


def images(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"tiny": torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))}


def capture_lm_input(model: VisualRWKV) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    def hook(module, args, kwargs):
        seen.append(kwargs["embeds"].detach().clone())

    model.rwkv.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_splicing_puts_each_image_at_its_own_placeholders(model: VisualRWKV, monkeypatch) -> None:
    """Known features (value = 1000*image + token) land exactly on the placeholders, in batch order."""
    counts = torch.tensor([2, 0, 1, 1])
    ids = batch_ids([
        [("t", 3), ("i", 1), ("t", 2), ("i", 1), ("t", 4)], [("t", 20)], [("i", 1), ("t", 5)], [("t", 7), ("i", 1)]
    ])
    known = (1000.0 * torch.arange(4).view(4, 1, 1) + torch.arange(P).view(1, P, 1)).expand(4, P, 64).clone()
    monkeypatch.setattr(model, "encode_images", lambda imgs: known[: imgs["tiny"].shape[0]])
    seen = capture_lm_input(model)
    model(ids, images(4), counts)
    fed = seen[0]
    text = model.rwkv.emb(ids.masked_fill(ids == IMAGE_TOKEN_ID, 0)).detach()
    mask = ids == IMAGE_TOKEN_ID
    torch.testing.assert_close(fed[~mask], text[~mask])
    got = {(b, t): fed[b, t, 0].item() for b, t in mask.nonzero().tolist()}
    want_rows = {0: [0, 1], 2: [2], 3: [3]}
    for b, imgs in want_rows.items():
        positions = mask[b].nonzero().flatten().tolist()
        expected = [1000.0 * i + p for i in imgs for p in range(P)]
        assert [got[(b, t)] for t in positions] == expected
    assert (fed[mask][:, 1:] == fed[mask][:, :1]).all()  # whole rows replaced


def test_splice_function_gradients_reach_features_and_text() -> None:
    ids = batch_ids([[("i", 1), ("t", 2)], [("t", 1), ("i", 1)]], length=P + 2)
    embeds = torch.randn(2, P + 2, 8, requires_grad=True)
    feats = torch.randn(2, P, 8, requires_grad=True)
    out = splice_image_features(embeds, ids, feats, torch.tensor([1, 1]), P)
    torch.testing.assert_close(out[1, 1 : 1 + P], feats[1])
    out.sum().backward()
    assert (feats.grad == 1).all()
    assert (embeds.grad[ids == IMAGE_TOKEN_ID] == 0).all() and (embeds.grad[ids != IMAGE_TOKEN_ID] == 1).all()


@pytest.mark.parametrize(
    ("layout", "counts", "n_images", "match"),
    [
        ([[("i", 1)], [("t", 3)]], [1, 1], 2,
         r"sample 1: 0 image placeholder tokens, but 1 image\(s\) x 16 tokens = 16"),
        ([[("i", 1)], [("i", 2)]], [2, 1], 3,
         r"sample 0: 16 image placeholder tokens, but 2 image\(s\) x 16 tokens = 32"),
        ([[("t", 2)], [("i", 1)]], [0, 1], 2, r"add up to 1 images, but the batch has 2"),
    ],
)
def test_placeholder_mismatch_names_the_sample(model: VisualRWKV, layout, counts, n_images, match) -> None:
    with pytest.raises(DataError, match=match):
        model(batch_ids(layout), images(n_images), torch.tensor(counts))


def test_one_placeholder_short_is_an_error_not_a_truncation(model: VisualRWKV) -> None:
    ids = batch_ids([[("t", 2)], [("t", 1), ("i", 1), ("t", 2)]])
    ids[1, 1] = 7  # 15 placeholders left
    with pytest.raises(DataError, match="sample 1: 15 image placeholder"):
        model(ids, images(1), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="sample 1: 15 .* not a multiple of tokens_per_image 16"):
        model(ids, images(1))
    with pytest.raises(DataError, match="sample 0: 16 image placeholder tokens, but 0 image"):
        model(batch_ids([[("i", 1)]]), None)


@torch.no_grad()
def test_counts_inferred_from_placeholders_match_explicit_counts(model: VisualRWKV) -> None:
    ids = batch_ids([[("i", 2), ("t", 3)], [("t", 4)], [("t", 1), ("i", 1)]])
    a, _ = model(ids, images(3), torch.tensor([2, 0, 1]))
    b, _ = model(ids, images(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_text_only_batch_equals_the_plain_lm(model: VisualRWKV) -> None:
    ids = batch_ids([[("t", 10)], [("t", 12)]])
    out, _ = model(ids)
    ref, _ = model.rwkv(ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _loss(model: VisualRWKV, ids: torch.Tensor, imgs, counts) -> torch.Tensor:
    logits, _ = model(ids, imgs, counts)
    labels = ids[:, 1:].masked_fill(ids[:, 1:] == IMAGE_TOKEN_ID, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("freeze", [True, False])
def test_training_step_with_0_1_2_images_per_sample(model: VisualRWKV, freeze: bool) -> None:
    model.vit.freeze(freeze)
    model.train()
    model.rwkv.requires_grad_(False)  # stage 1: projector (and an unfrozen tower) only
    ids = batch_ids([[("t", 12)], [("i", 1), ("t", 9)], [("t", 2), ("i", 2), ("t", 6)]], length=48)
    imgs, counts = images(3), torch.tensor([0, 1, 2])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.proj.parameters()} | (
        set() if freeze else {id(p) for p in model.vit.parameters()})
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    loss = _loss(model, ids, imgs, counts)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.proj.parameters())
    tower = model.vit.featurizer("tiny")
    assert tower.training is (not freeze)
    if freeze:
        assert all(p.grad is None for p in model.vit.parameters())
    else:
        assert tower.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        assert tower.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.rwkv.parameters())
    before = model.proj.gate.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.proj.gate.weight)
    with torch.no_grad():
        assert _loss(model, ids, imgs, counts) < loss


def test_prefill_then_rnn_continuation_matches_one_pass(model: VisualRWKV) -> None:
    model.eval()
    ids = batch_ids([[("t", 3), ("i", 1), ("t", 10)], [("i", 2), ("t", 5)]], length=2 * P + 12)
    imgs, counts = images(3), torch.tensor([1, 2])
    full, _ = model(ids, imgs, counts)
    k = 2 * P + 2  # every placeholder is before k
    last, state = model.prefill(ids[:, :k], imgs, counts)
    torch.testing.assert_close(last, full[:, k - 1], rtol=1e-4, atol=1e-4)
    for t in range(k, ids.shape[1]):
        step, state = model.prefill(ids[:, t : t + 1], state=state)
        torch.testing.assert_close(step, full[:, t], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_bf16_model_runs_towers_projector_and_lm_in_bf16(model: VisualRWKV) -> None:
    ids = batch_ids([[("i", 1), ("t", 4)]], length=P + 4)
    ref_feats = model.encode_images(images(1))
    ref, _ = model(ids, images(1))
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and next(model.vit.parameters()).dtype == torch.bfloat16
    feats = model.encode_images(images(1))  # fp32 pixels are cast to the towers' dtype
    assert feats.dtype == torch.bfloat16
    assert (feats.float() - ref_feats).norm() / ref_feats.norm() < 0.05
    out, _ = model(ids, images(1))
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).abs().max() / ref.std()) < 0.1


def test_linear_projector_model_and_processor_round_trip(tiny_image) -> None:
    model = build(projector="linear")
    assert tuple(model.state_dict()["proj.weight"].shape) == (64, 32)
    imgs = model.image_processor.batch([tiny_image, tiny_image.crop((0, 0, 40, 64))])
    feats = model.encode_images(imgs)
    assert feats.shape == (2, P, 64)
    assert not torch.allclose(feats[0], feats[1])


def test_x060_visual_rwkv_reverses_patch_rows_and_decodes_exactly() -> None:
    """VisualRWKV with an RWKV-6 LM (tiny tower: 16 tokens = 15 reversed rows + the last):
    forward = the LM with the reversal; prefill through the image then RNN steps = forward."""
    from vrwkv_core.tokenizer import IMAGE_TOKEN_ID

    model = build_tiny_v6()
    ids = torch.tensor([[5, 6, 7] + [IMAGE_TOKEN_ID] * 16 + [8, 9, 10, 11, 12]])
    images = {"tiny": torch.randn(1, 3, 32, 32)}
    with torch.no_grad():
        full, _ = model(ids, images)
        embeds = model.embed(ids, images)
        want, _ = model.rwkv(embeds=embeds, reverse_spans=[(3, 18)])
        plain, _ = model.rwkv(embeds=embeds)
        assert torch.allclose(full, want, atol=1e-5) and not torch.allclose(full, plain, atol=1e-3)
        logits, state = model.prefill(ids[:, :21], images)  # text, image, two text tokens
        assert torch.allclose(logits, full[:, 20], atol=1e-4)
        for t in range(21, ids.shape[1]):
            out, state = model.rwkv(ids[:, t : t + 1], state=state)
            assert torch.allclose(out[:, 0], full[:, t], atol=1e-4)
