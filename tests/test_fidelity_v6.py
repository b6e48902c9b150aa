"""Issue 23, items 7 and 8: VisualRWKV v6.0's text-only samples, batch alignment and grid pooling,
against hand-built values and a transcription of the original's `preparing_embedding`."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_v6

from vrwkv_core.config import clip_tokens, load_recipe
from vrwkv_core.data.conversation import IGNORE_INDEX, encode_conversation_info
from vrwkv_core.data.dataset import collate
from vrwkv_core.errors import RecipeError
from vrwkv_core.eval.benchmarks import get_benchmark
from vrwkv_core.eval.generate import _build_input
from vrwkv_core.eval.questions import Question
from vrwkv_core.model.families import FAMILIES
from vrwkv_core.model.vision.clip import build_clip_tower, clip_features, clip_grid_pool, clip_patch_spans
from vrwkv_core.model.vision.towers import TOWERS
from vrwkv_core.recipe_schema import VisionSection
from vrwkv_core.tokenizer import BLANK_IMAGE_TOKEN_ID as B
from vrwkv_core.tokenizer import IMAGE_TOKEN_ID as I
from vrwkv_core.tokenizer import default_tokenizer

O6_IMAGE = -200  # the original's IMAGE_TOKEN_INDEX: one id per image in its input_ids


class CharTokenizer:
    """One id per character (ids >= 1000 keep clear of the image ids)."""

    def encode(self, text: str) -> list[int]:
        return [1000 + ord(c) for c in text]


# ------------------------------------------------------------------ item 8: grid_size


def _rows() -> torch.Tensor:
    """[1, 4x4 patches + CLS, 1]: patch i holds i (row-major), CLS holds 100."""
    return torch.tensor([float(i) for i in range(16)] + [100.0]).view(1, 17, 1)


@pytest.mark.parametrize("grid, want", [
    (-1, [float(i) for i in range(16)] + [100.0]),   # 576 patches + CLS: unchanged
    (0, [100.0]),                                    # CLS only
    (1, [7.5, 100.0]),                               # mean of 0..15, then CLS
    (2, [2.5, 4.5, 10.5, 12.5, 100.0]),              # 2x2 means of the 2x2 blocks (0,1,4,5)...
    (4, [float(i) for i in range(16)] + [100.0]),    # kernel 1: the patches themselves
])  # fmt: skip
def test_grid_pool_follows_the_v6_code(grid: int, want: list[float]) -> None:
    assert clip_grid_pool(_rows(), grid).flatten().tolist() == want


def test_clip_token_counts_per_grid_size() -> None:
    assert [clip_tokens(g) for g in (-1, 0, 1, 2, 3, 24)] == [577, 1, 2, 5, 10, 577]


def test_clip_tower_rows_use_the_recipe_grid_size() -> None:
    torch.manual_seed(0)
    tower = build_clip_tower(img_size=56, embed_dim=32, depth=1, num_heads=2).eval()  # 4x4 patches
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        rows = clip_features(tower, pixels)
        got = TOWERS["clip"].rows(tower, pixels, VisionSection(towers=["clip"], grid_size=2))
    assert got.shape == (2, 5, 32)
    assert torch.allclose(got[:, 0], rows[:, [0, 1, 4, 5]].mean(1), atol=1e-6)
    assert torch.equal(got[:, 4], rows[:, 16])  # the CLS row stays last
    assert TOWERS["clip"].tokens(VisionSection(towers=["clip"], grid_size=0)) == 1


@pytest.mark.parametrize("overrides, message", [
    (["model.vision.grid_size=5"], "model.vision.grid_size: 5 does not divide the clip tower's 24x24 patch grid"),
    (["model.vision.grid_size=-2"], "model.vision.grid_size: -2 is out of range: must be >= -1"),
    (["model.vision.grid_size=2"], "model.tokens_per_image: the clip tower with model.vision.grid_size 2 gives 5 tokens, not 577"),
])  # fmt: skip
def test_grid_size_recipe_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe("recipes/v6-1b6.yaml", overrides)


def test_grid_size_is_a_clip_option() -> None:
    recipe = load_recipe("recipes/v6-1b6.yaml", ["model.vision.grid_size=2", "model.tokens_per_image=5"])
    assert (recipe.model.vision.grid_size, recipe.model.tokens_per_image) == (2, 5)
    assert load_recipe("recipes/v6-1b6.yaml").model.vision.grid_size == -1  # the released models'
    with pytest.raises(RecipeError, match="grid_size: 2: only the clip tower"):
        load_recipe("recipes/tiny.yaml", ["model.vision.grid_size=2"])


# ------------------------------------------------------------------ item 7: text-only samples


def test_family_defaults() -> None:
    assert FAMILIES["x060"].blank_image_rows and FAMILIES["x060"].align_images
    assert not FAMILIES["x070"].blank_image_rows and not FAMILIES["x070"].align_images


def test_text_only_sample_starts_with_a_blank_image() -> None:
    tok = CharTokenizer()
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    enc = encode_conversation_info(conv, tok, 3, blank_image=True)
    user = [1000 + ord(c) for c in "User: Hi\n\n"]
    assistant = [1000 + ord(c) for c in "Assistant: Yo\n\n"]
    assert enc.input_ids == [B, B, B] + user + assistant
    assert enc.labels == [IGNORE_INDEX] * (3 + len(user) + 10) + assistant[10:]  # "Assistant:" is 10 chars here
    assert enc.n_images == 0
    # with an image nothing is added; a v7 sample (blank_image False) is unchanged
    with_image = [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]
    assert B not in encode_conversation_info(with_image, tok, 3, blank_image=True).input_ids
    assert encode_conversation_info(conv, tok, 3).input_ids == user + assistant


def test_blank_rows_count_towards_ctx_len_and_are_cut_whole() -> None:
    tok = CharTokenizer()
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    enc = encode_conversation_info(conv, tok, 3, ctx_len=8, blank_image=True, truncation="head")
    assert enc.input_ids == [B, B, B] + [1000 + ord(c) for c in "User:"]


def _sample(ids: list[int], labels: list[int] | None = None, n_images: int = 0) -> dict:
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels or [IGNORE_INDEX] * len(ids)),
            "images": [torch.zeros(3, 2, 2)] * n_images}  # fmt: skip


def test_collate_aligns_images_with_token0_left_padding() -> None:
    a = _sample([5, 6, I, I, 7], [-100, -100, -100, -100, 7], n_images=1)  # image at 2
    b = _sample([B, B, 8, 9], [-100, -100, -100, 9])                       # text-only: blank at 0
    c = _sample([4, I, I, 3], [-100, -100, -100, 3], n_images=1)           # image at 1
    batch = collate([a, b, c], align_images=True)
    assert batch["input_ids"].tolist() == [[5, 6, I, I, 7, 0], [0, 0, B, B, 8, 9], [0, 4, I, I, 3, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 7, -100], [-100, -100, -100, -100, -100, 9],
                                        [-100, -100, -100, -100, 3, -100]]  # fmt: skip
    assert batch["image_counts"].tolist() == [1, 0, 1]
    assert collate([a, b, c], pad_to=8, align_images=True)["input_ids"].shape == (3, 8)
    assert collate([a, b, c])["input_ids"].tolist()[1] == [B, B, 8, 9, 0]  # no alignment: right padding only


def _o6_preparing_embedding(raw_ids: list[list[int]], raw_labels: list[list[int]], feats: torch.Tensor,
                            emb: torch.nn.Module, ctx_len: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:  # fmt: skip
    """VisualRWKV-v6.0 src/model.py `preparing_embedding` + `truncate_input`, transcribed (the
    dataset pads ids to ctx_len with 0); returns embeds, labels, img_start, img_end."""
    ids = [torch.tensor(r + [0] * (ctx_len - len(r))) for r in raw_ids]
    labels = [torch.tensor(r + [IGNORE_INDEX] * (ctx_len - len(r))) for r in raw_labels]
    starts = [int((x == O6_IMAGE).nonzero()[0]) for x in ids if (x == O6_IMAGE).sum() == 1]
    m = max(starts, default=0)
    out_x, out_y = [], []
    for x, y, f in zip(ids, labels, feats):
        pre_x, pre_y = torch.zeros(m, dtype=torch.long), torch.full((m,), IGNORE_INDEX)
        if (x == O6_IMAGE).sum() == 0:
            f = torch.zeros_like(f)  # "mask image feature, set to 0"
            rest_x, rest_y = x, y
        else:
            i = int((x == O6_IMAGE).nonzero()[0])
            pre_x[m - i:], pre_y[m - i:] = x[:i], y[:i]
            rest_x, rest_y = x[i + 1:], y[i + 1:]
        e = torch.cat([emb(pre_x), f, emb(rest_x)])
        lab = torch.cat([pre_y, torch.full((f.shape[0],), IGNORE_INDEX), rest_y])
        keep = (lab[:ctx_len] != IGNORE_INDEX).any()
        out_x.append(e[:ctx_len] if keep else e[-ctx_len:])
        out_y.append(lab[:ctx_len] if keep else lab[-ctx_len:])
    return torch.stack(out_x), torch.stack(out_y), m, m + feats.shape[1] - 1


@torch.no_grad()
def test_batch_matches_the_original_preparing_embedding() -> None:
    """Two image samples (image at 2 and 5) and a text-only one, through collate + VisualRWKV x060,
    give the original's input rows, labels and reversed rows exactly, so the same logits."""
    model = build_tiny_v6()  # tiny tower: 16 rows per image
    P, ctx = model.tokens_per_image, 40
    raw = [[11, 12, O6_IMAGE, 13, 14, 15], [21, 22, 23, 24, 25, O6_IMAGE, 26, 27], [31, 32, 33, 34]]
    raw_labels = [[-100, -100, -100, -100, 14, 15], [-100] * 6 + [26, 27], [-100, -100, 33, 34]]
    ours = []
    for r, lab in zip(raw, raw_labels):
        if O6_IMAGE in r:
            i = r.index(O6_IMAGE)
            ids, labels = r[:i] + [I] * P + r[i + 1:], lab[:i] + [IGNORE_INDEX] * P + lab[i + 1:]
        else:  # what encode_conversation_info(blank_image=True) gives a text-only sample
            ids, labels = [B] * P + r, [IGNORE_INDEX] * P + lab
        ours.append(_sample(ids, labels, n_images=int(O6_IMAGE in r)))
    batch = collate(ours, pad_to=ctx, align_images=True)
    pixels = torch.randn(2, 3, 32, 32)
    feats = model.encode_images({"tiny": pixels})  # [2, P, C]
    all_feats = torch.stack([feats[0], feats[1], torch.randn_like(feats[0])])  # the text-only one is zeroed
    want_x, want_y, start, end = _o6_preparing_embedding(raw, raw_labels, all_feats, model.rwkv.emb, ctx)
    got_x = model.embed(batch["input_ids"], {"tiny": pixels}, batch["image_counts"])
    assert torch.equal(batch["labels"], want_y)
    assert torch.allclose(got_x, want_x, atol=1e-6)
    assert torch.equal(got_x[2, start:start + P], torch.zeros(P, got_x.shape[-1]))
    # the original reverses rows [img_start, img_end) of every sample on odd layers
    got, _ = model(batch["input_ids"], {"tiny": pixels}, batch["image_counts"])
    want, _ = model.rwkv(embeds=want_x, reverse_spans=[(start, end)] * 3)
    assert torch.allclose(got, want, atol=1e-5)
    plain, _ = model.rwkv(embeds=want_x, reverse_spans=[(start, end), (start, end), None])
    assert not torch.allclose(got[2], plain[2], atol=1e-4)  # the blank rows are reversed too


class _V6Stub:
    """What `_build_input` reads of a model."""

    def __init__(self, version: str) -> None:
        self.family, self.tokens_per_image = FAMILIES[version], 3


def test_eval_text_only_prompt_starts_with_a_blank_image_for_v6_only() -> None:
    q = Question(question_id=1, text="What is 2+2?", image=None)
    bench = get_benchmark("scienceqa")
    ids6, images, error = _build_input(_V6Stub("x060"), default_tokenizer(), bench, q, None, "v6")
    ids7, _, _ = _build_input(_V6Stub("x070"), default_tokenizer(), bench, q, None, "v6")
    assert images is None and error is None
    assert ids6 == [B, B, B] + ids7 and B not in ids7
    assert clip_patch_spans(torch.tensor(ids6).masked_fill(torch.tensor(ids6) == B, I), I, 3) == [[(0, 2)]]


def test_grid_size_error_is_one_line_from_the_cli(capsys) -> None:
    from vrwkv_cli.main import run

    assert run(["pretrain", "recipes/v6-1b6.yaml", "model.vision.grid_size=5", "--print-config"]) == 1
    err = capsys.readouterr().err
    assert "model.vision.grid_size: 5 does not divide" in err and "Traceback" not in err


@pytest.mark.slow
def test_v6_trains_on_a_mix_of_image_and_text_only_samples(tmp_path, monkeypatch) -> None:
    """A tiny x060 stage over image records and text-only records: every batch is aligned, each
    text-only sample carries one blank image, and the loss stays finite."""
    import csv
    import json
    import math

    from vrwkv_cli.main import run
    from vrwkv_core.data import dataset
    from vrwkv_core.data.shapes import prepare_shapes

    data = prepare_shapes(tmp_path / "shapes", n_train=6, n_eval=2, seed=2)
    text_only = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                    {"from": "gpt", "value": f"{i}."}]} for i in range(6)]  # fmt: skip
    with open(data / "pretrain.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in text_only))
    seen: list[dict] = []
    real_collate = dataset.collate
    monkeypatch.setattr(dataset, "collate", lambda *a, **k: seen.append(real_collate(*a, **k)) or seen[-1])
    monkeypatch.setattr("vrwkv_core.train.data.collate", dataset.collate)
    args = [
        f"data.root={data}", "data.ctx_len=96", "data.val_fraction=0",
        "model.rwkv.version=x060", "model.rwkv.n_layer=2", "model.rwkv.n_embd=64", "model.rwkv.head_size=32",
        "model.vision.image_size=32", "model.vision.tiny.width=32", "model.vision.tiny.depth=1",
        "model.tokens_per_image=16", "model.projector.type=linear", f"pretrain.out_dir={tmp_path / 'pre'}",
        "pretrain.max_steps=3", "pretrain.micro_batch=4", "pretrain.warmup_steps=0",
    ]  # fmt: skip
    assert run(["pretrain", "recipes/tiny.yaml", *args]) == 0
    blanks = 0
    for batch in seen:
        ids = batch["input_ids"]
        starts = {int(((row == I) | (row == B)).nonzero()[0]) for row in ids}
        assert len(starts) == 1  # every image or blank run starts at one position
        for row, n_img in zip(ids, batch["image_counts"].tolist()):
            assert int((row == B).sum()) == (0 if n_img else 16)
        blanks += int((batch["image_counts"] == 0).sum())
    assert blanks > 0
    with open(tmp_path / "pre" / "metrics.csv") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]]
    assert losses and all(math.isfinite(x) for x in losses)
