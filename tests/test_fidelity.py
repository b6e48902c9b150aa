"""Issue 23: vrwkv reproduces the original VisualRWKV code; one test per item, against hand-built values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vrwkv_core.config import load_recipe
from vrwkv_core.data.conversation import SHORT_ANSWER as SA
from vrwkv_core.data.conversation import encode_conversation_info, normalize_conversations
from vrwkv_core.data.order import OriginalOrderSampler, magic_prime, original_index
from vrwkv_core.data.rounds import split_rounds
from vrwkv_core.errors import RecipeError
from vrwkv_core.train.module import sequence_loss

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path("/work/shared/testdata/llava-textvqa-sample")
if not SAMPLE.is_dir():
    SAMPLE = REPO.parent / "shared" / "testdata" / "llava-textvqa-sample"


class CharTokenizer:
    """One id per character (ids >= 1000 keep clear of the image id)."""

    def encode(self, text: str) -> list[int]:
        return [1000 + ord(c) for c in text]


def _record(n_rounds: int, empty: set[int]) -> dict:
    turns = []
    for i in range(1, n_rounds + 1):
        q = f"<image>\nQ{i}\n{SA}" if i == 1 else f"Q{i}"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": "" if i in empty else f"A{i}"}]
    return {"id": "r1", "image": "a.jpg", "conversations": turns}


def test_1_clean_and_split_rounds_as_the_original():
    chunks = split_rounds(_record(12, {4}), max_rounds=5)
    humans = [[t["value"] for t in c["conversations"] if t["from"] == "human"] for c in chunks]
    assert humans == [
        [f"<image>\nQ1\n{SA}", "Q2", "Q3", "Q5", "Q6"],
        [f"<image>\nQ7\n{SA}", "Q8", "Q9", "Q10", "Q11"],
        [f"<image>\nQ12\n{SA}"],
    ]
    assert {(c["id"], c["image"]) for c in chunks} == {("r1", "a.jpg")}
    v6 = split_rounds(_record(12, {4}), max_rounds=10, readd_instruction=False)
    assert [t["value"] for t in v6[1]["conversations"] if t["from"] == "human"] == ["<image>\nQ12"]
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}] * 3}
    assert [c["conversations"][0]["value"] for c in split_rounds(text_only, 2)] == ["hi", "hi"]  # no <image> added
    assert split_rounds(_record(2, {1, 2}), 5) == []  # no answered pair left: dropped


def test_1_prepare_data_llava_max_rounds_on_the_sample(tmp_path):
    from vrwkv_core.data.prepare import prepare_llava

    report = prepare_llava(SAMPLE / "data.json", SAMPLE / "images", tmp_path, max_rounds=5, workers=1)
    rounds = json.loads((tmp_path / "stats.json").read_text())["rounds"]
    # the sample holds 1000 one-round records: nothing to drop or split
    assert rounds == {"max_rounds": 5, "readd_instruction": True, "source_records": 1000, "records_out": 1000,
                      "pairs_dropped": 0, "records_dropped": 0, "records_split": 0}  # fmt: skip
    assert report.accepted == 1000


TABLE = {  # recipe: {stage: (ctx, micro, devices, accum, steps, lr_init, lr_final)}
    "0b1": {"pretrain": (2048, 32, 8, 1, 2000, 1e-3, 5e-5), "finetune": (2048, 16, 8, 1, 15000, 6e-5, 1.5e-5)},
    "v6-1b6": {"pretrain": (1024, 16, 4, 2, 4500, 1e-3, 1e-5), "finetune": (1024, 16, 8, 1, 1000, 3e-5, 1.5e-5)},
    "v6-3b": {"pretrain": (1024, 8, 4, 4, 4500, 1e-3, 1e-5), "finetune": (1024, 8, 8, 2, 10000, 2e-5, 2e-5)},
    "v6-7b": {"pretrain": (1024, 8, 4, 4, 4500, 1e-3, 1e-5), "finetune": (1024, 2, 4, 16, 10625, 2e-5, 2e-5)},
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_2_recipes_match_the_original_scripts(name):
    r = load_recipe(REPO / "recipes" / f"{name}.yaml")
    for stage, (ctx, micro, devices, accum, steps, lr0, lr1) in TABLE[name].items():
        st = getattr(r, stage)
        got = (r.data.ctx_len, st.micro_batch, st.devices, st.grad_accum, st.max_steps, st.lr_init, st.lr_final)
        assert got == (ctx, micro, devices, accum, steps, lr0, lr1), stage
        assert (st.warmup_steps, st.weight_decay, st.grad_clip, st.l2wrap, st.loss_mean) == (0, 0.0, 1.0, 1e-4, "all_samples")
    assert r.pretrain.trainable == ["projector"] and r.hardware.strategy == "deepspeed_stage_1"
    assert (r.data.order, r.data.val_fraction, r.data.truncation) == ("original", 0.0, "original")
    if name == "v6-7b":
        assert "projector" not in r.finetune.trainable


def test_2_global_batch_derives_accumulation_and_must_divide(capsys):
    r = load_recipe(REPO / "recipes" / "v6-1b6.yaml", ["pretrain.devices=2"])
    assert r.pretrain.grad_accum == 4  # 128 = 16 x 2 x 4: same samples per step on half the GPUs
    with pytest.raises(RecipeError, match=r"pretrain\.global_batch: 128 is not a multiple of .* = 48"):
        load_recipe(REPO / "recipes" / "v6-1b6.yaml", ["pretrain.devices=3"])
    from vrwkv_cli.main import run

    run(["pretrain", str(REPO / "recipes" / "v6-7b.yaml"), "--print-config"])
    out = capsys.readouterr().out
    assert "global_batch: 128" in out and "grad_accum: 16" in out and "devices: 4" in out


def test_3_original_order_visits_k_cubed_mod_p():
    assert magic_prime(100) == 89  # 97 is prime but 97 mod 3 = 1
    assert [original_index(k, 100, 89) for k in (0, 1, 2, 3, 4, 5, 88, 89, 90)] == [0, 1, 8, 27, 64, 36, 88, 99, 98]
    # k = n * world + rank: rank 1 of 2 draws k = 1, 3, 5
    assert list(OriginalOrderSampler(100, 3, rank=1, world_size=2)) == [1, 27, 36]
    s = OriginalOrderSampler(100, 4)
    s.load_state_dict({"consumed": 2, "dataset_len": 100, "world_size": 1})
    assert list(s) == [8, 27]
    tiny = load_recipe(REPO / "recipes" / "tiny.yaml")
    assert tiny.data.order == "shuffle" and tiny.data.val_fraction > 0


def test_4_logit_l2_names_its_replacement(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("finetune:\n  logit_l2: 0.1\n")
    with pytest.raises(RecipeError, match=r"'finetune\.logit_l2' was replaced by 'finetune\.l2wrap'"):
        load_recipe(path)


def test_5_loss_over_all_samples_and_original_truncation():
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 4, bias=False)
    hidden = torch.randn(2, 3, 3)
    labels = torch.tensor([[-100, 1, 2], [-100, -100, -100]])  # sample 2 has no labels
    ours, _ = sequence_loss(hidden, labels, head)
    original, _ = sequence_loss(hidden, labels, head, loss_mean="all_samples")
    assert original.item() == pytest.approx(ours.item() / 2, rel=1e-6)  # (l1 + 0) / B
    tok = CharTokenizer()
    conv = [{"from": "human", "value": "<image>\nab"}, {"from": "gpt", "value": "c"}]
    # "User: " is 6 ids, then 4 image rows: ctx 8 cuts the image after 2 rows
    head_cut = encode_conversation_info(conv, tok, 4, ctx_len=8, truncation="head")
    assert len(head_cut.input_ids) == 8 and head_cut.image_rows == 2 and head_cut.n_images_kept == 1
    ours_cut = encode_conversation_info(conv, tok, 4, ctx_len=8)
    assert len(ours_cut.input_ids) == 6 and ours_cut.n_images_kept == 0
    long_q = [{"from": "human", "value": "x" * 20}, {"from": "gpt", "value": "c"}]
    tail = encode_conversation_info(long_q, tok, 4, ctx_len=10, truncation="tail_if_unlabelled")
    full = encode_conversation_info(long_q, tok, 4)
    assert tail.input_ids == full.input_ids[-10:] and tail.n_labelled > 0


def test_5_partial_image_is_spliced_from_its_first_rows():
    from vrwkv_core.model.visual_rwkv import IMAGE_TOKEN_ID, splice_image_features

    ids = torch.tensor([[7, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID]])
    feats = torch.arange(8.0).view(1, 4, 2)  # one image, 4 rows
    out = splice_image_features(torch.zeros(1, 3, 2), ids, feats, torch.tensor([1]), 4, partial_images=True)
    assert out[0].tolist() == [[0, 0], [0, 1], [2, 3]]


def test_6_v6_middle_and_last_positions():
    turns = [{"from": "human", "value": f"<image>\nWhat is it?\n{SA}"}, {"from": "gpt", "value": "a"},
             {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "b"},
             {"from": "human", "value": f"Where?\n{SA}"}, {"from": "gpt", "value": "c"}]  # fmt: skip
    first = normalize_conversations(turns, "middle")[0]["value"]
    assert first == f"What is it?\nWhat color?\nWhere?\n{SA}\n<image>\nWhat is it?\n{SA}"
    assert normalize_conversations(turns[:2], "last")[0]["value"] == f"What is it?\n{SA}\n<image>"


def test_9_frozen_layers_as_freeze_rwkv():
    from helpers import build_tiny_vlm
    from vrwkv_core.train.module import apply_trainable

    vlm = build_tiny_vlm()
    r = load_recipe(REPO / "recipes" / "tiny.yaml", ["finetune.frozen_layers=1"])
    apply_trainable(vlm, r.finetune)
    train = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert not any(n.startswith("rwkv.blocks.0.") for n in train)
    assert any(n.startswith("rwkv.blocks.1.") for n in train) and "rwkv.head.weight" in train
    r = load_recipe(REPO / "recipes" / "tiny.yaml", [f"finetune.frozen_layers={len(vlm.rwkv.blocks)}"])
    apply_trainable(vlm, r.finetune)
    assert not any(p.requires_grad for p in vlm.rwkv.parameters())


def test_11_sam_layernorm_eps():
    from vrwkv_core.config import VisionSection
    from vrwkv_core.model.vision.towers import build_featurizer

    sam = build_featurizer("sam", VisionSection())
    assert {m.eps for m in sam.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}


def test_12_tiling_as_the_original():
    from vrwkv_core.model.vision.tiling import choose_grid, tile_image

    # 640x480: 896x448 wastes 401408 - 597*448 = 133952, the least of the five
    assert choose_grid(640, 480) == (2, 1)
    img = Image.new("RGB", (640, 480), (255, 0, 0))
    img.paste((0, 0, 255), (320, 0, 640, 480))
    views = tile_image(img, 448)
    assert [v.size for v in views] == [(640, 480), (320, 480), (320, 480)]
    assert [v.getpixel((0, 0)) for v in views[1:]] == [(255, 0, 0), (0, 0, 255)]  # original pixels, row-major


@pytest.mark.slow
def test_tiny_recipe_with_original_order_and_l2wrap(tmp_path, monkeypatch):
    from vrwkv_core.data.shapes import prepare_shapes
    from vrwkv_core.train import run_stage

    data = prepare_shapes(tmp_path / "shapes", n_train=40, n_eval=4, seed=1)
    monkeypatch.setenv("VRWKV_TRACE_BATCHES", "1")
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [
        f"data.root={data}", "data.val_fraction=0", "data.order=original", "pretrain.l2wrap=1e-4",
        f"pretrain.out_dir={tmp_path / 'pre'}", "pretrain.max_steps=2", "pretrain.micro_batch=4",
        "pretrain.val_every_steps=0", "pretrain.save_every_steps=2"])  # fmt: skip
    run_stage(recipe, "pretrain")
    records = [json.loads(x) for x in (data / recipe.data.pretrain_file).read_text().splitlines() if x.strip()]
    n = len(records)
    p = magic_prime(n)
    want = [str(records[original_index(k, n, p)]["id"]) for k in range(8)]
    lines = (tmp_path / "pre" / "ranks" / "rank0.txt").read_text().splitlines()
    got = [i for line in lines for i in line.split("\t")[2].split()]
    assert got == want
    assert all(float(line.split("\t")[1]) == float(line.split("\t")[1]) for line in lines)  # finite
