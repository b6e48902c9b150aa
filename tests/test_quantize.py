"""quantize(model, fmt): each format against fp32 on random small LMs (RWKV-7 and RWKV-6), the
int4 scale search against plain rounding, save/load and export round trips, and the trained
tiny model's shapes answers under fp16/int8/int4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_vlm

from vrwkv_core import RWKV6, RWKV7, quantize
from vrwkv_core.bench.lm import random_rwkv7_weights
from vrwkv_core.bench.lm6 import random_rwkv6_weights
from vrwkv_core.checkpoint import export_quantized
from vrwkv_core.config import RWKVSection
from vrwkv_core.errors import VrwkvError
from vrwkv_core.infer.loading import load_model
from vrwkv_core.model.rwkv.quant import QuantLinear, quantize_int4, unpack_int4

CFG = RWKVSection(n_layer=2, n_embd=256, head_size=64, vocab_size=1000)
# relative logit error ||l - l_fp32|| / ||l_fp32|| on random weights (which exaggerate it)
# (int8's activations are quantized too, per row: fbgemm's dynamic int8 kernel)
BOUNDS = {"fp16": 2e-3, "int8": 6e-2, "int4": 0.3}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _lms():
    return {
        "x070": (RWKV7, random_rwkv7_weights(CFG, seed=3)),
        "x060": (RWKV6, random_rwkv6_weights(RWKVSection(version="x060", n_layer=2, n_embd=256, head_size=64,
                                                         vocab_size=1000), seed=3)),
    }  # fmt: skip


@pytest.mark.parametrize("family", ["x070", "x060"])
@torch.no_grad()
def test_each_format_stays_near_fp32_and_decodes_like_its_forward(family):
    cls, sd = _lms()[family]
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    ref, _ = cls.from_state_dict(sd).eval()(ids)
    errs = {}
    for fmt, bound in BOUNDS.items():
        model = quantize(cls.from_state_dict(sd).eval(), fmt)
        assert model.quant == fmt and isinstance(model.head, QuantLinear)
        assert model.emb.weight.dtype == torch.float32  # embeddings stay full precision
        out, _ = model(ids)
        errs[fmt] = _rel(out, ref)
        assert errs[fmt] < bound, (fmt, errs[fmt])
        # the single-token step path gives the forward's logits (same quantized weights)
        _, state = model(ids[:, :11])
        step, _ = model(ids[:, 11:], state=state)
        assert _rel(step[:, 0], out[:, 11]) < 1e-2
    assert errs["fp16"] < errs["int8"] < errs["int4"]


def test_int4_scales_beat_plain_rounding_and_the_kernel_matches_the_codes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * torch.rand(256, 1, generator=g)  # uneven row scales
    w[3, 7] = 8.0  # an outlier, as trained weights have
    q, s, off = quantize_int4(w, 128)
    codes = unpack_int4(q).float().view(256, 4, 128)
    ours = ((codes - 8) * s.float()[..., None] + off.float()[..., None]).view(256, 512)
    wg = w.view(256, 4, 128)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    plain = (((wg - lo) / ((hi - lo) / 15)).round() * ((hi - lo) / 15) + lo).view(256, 512)
    assert (ours - w).norm() < 0.97 * (plain - w).norm()
    layer = QuantLinear.from_linear(w, "int4", 128)
    x = torch.randn(3, 512, generator=g)
    with torch.no_grad():
        y = layer(x)  # the packed CPU kernel (bf16 activations)
    assert _rel(y, x @ ours.t()) < 1e-2
    assert layer.dequantized().equal(ours)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
@torch.no_grad()
def test_a_row_gets_the_same_bits_alone_or_among_other_rows(fmt):
    g = torch.Generator().manual_seed(1)
    layer = QuantLinear.from_linear(torch.randn(96, 256, generator=g) / 16, fmt, 128)
    x = torch.randn(8, 256, generator=g)
    x[5] *= 1000  # a row with a far larger range must not change the others' quantization
    batched = layer(x)
    for i in (0, 5, 7):
        assert torch.equal(layer(x[i : i + 1])[0], batched[i]), i
    assert _rel(batched, x @ layer.dequantized().t()) < 2e-2  # and it is the stored weight's product


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
@torch.no_grad()
def test_a_decode_step_gives_a_row_the_same_logits_alone_or_among_seven_others(fmt):
    lm = quantize(RWKV7.from_state_dict(random_rwkv7_weights(CFG, seed=4)).eval(), fmt).optimize_for_inference()
    ids = torch.randint(0, 1000, (8, 5), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the decode route of one thread (numpy LoRA rows)
    try:
        _, state = lm(ids[:, :4])
        batched, _ = lm(ids[:, 4:], state=state)
        for i in (0, 6):
            alone, _ = lm(ids[i : i + 1, 4:], state=state[i])
            assert torch.equal(alone[0], batched[i]), i
    finally:
        torch.set_num_threads(threads)


def test_quantize_rejects_unknown_formats_and_twice():
    model = RWKV7.from_state_dict(random_rwkv7_weights(CFG))
    with pytest.raises(VrwkvError, match="unknown quantization 'int3'"):
        quantize(model, "int3")
    quantize(model, "int8")
    with pytest.raises(VrwkvError, match="already quantized"):
        quantize(model, "int4")


@torch.no_grad()
def test_a_visual_rwkv_keeps_its_towers_and_a_bf16_model_keeps_its_scales():
    vlm = quantize(build_tiny_vlm(), "int4")
    assert isinstance(vlm.rwkv.blocks[0].ffn.key, QuantLinear)
    assert not any(isinstance(m, QuantLinear) for m in vlm.vit.modules())
    vlm.to(torch.bfloat16)  # the model's dtype changes; the stored codes and scales do not
    key = vlm.rwkv.blocks[0].ffn.key
    assert key.scales.dtype == key.offsets.dtype == torch.bfloat16 and key.qweight.dtype == torch.uint8
    head = vlm.rwkv.head  # int4's default head: int8
    assert head.fmt == "int8" and head.qweight.dtype == torch.int8 and head.scales.dtype == torch.bfloat16
    out, _ = vlm.rwkv(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
@torch.no_grad()
def test_a_quantized_lm_saves_and_loads_bit_exactly(fmt, tmp_path):
    model = quantize(RWKV7.from_state_dict(random_rwkv7_weights(CFG)).eval(), fmt)
    ids = torch.tensor([[5, 6, 7, 8]])
    ref, _ = model(ids)
    model.save(tmp_path / "q.safetensors")
    back = RWKV7.from_checkpoint(tmp_path / "q.safetensors")
    assert back.quant == fmt and type(back.blocks[1].att.key) is QuantLinear
    assert back.blocks[1].att.key.fmt == fmt
    out, _ = back(ids)
    assert torch.equal(out, ref)


@pytest.mark.slow
@torch.no_grad()
def test_export_int8_dir_loads_quantized_smaller_and_equal(tiny_trained, tmp_path):
    src = tiny_trained["finetune"]
    info = export_quantized(src, "int8", tmp_path / "int8")
    assert info["bytes"] < (src / "model.safetensors").stat().st_size
    loaded = load_model(tmp_path / "int8", device="cpu")
    assert loaded.rwkv.quant == "int8" and loaded.rwkv.blocks[0].att.key.qweight.dtype == torch.int8
    # the packed int8 kernel crashed on codes left at their (8-byte aligned) safetensors offsets
    assert all(b.data_ptr() % 64 == 0 for n, b in loaded.rwkv.named_buffers() if n.endswith(("qweight", "scales")))
    in_memory = load_model(src, device="cpu", quant="int8")
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    a, _ = loaded.rwkv(ids)
    b, _ = in_memory.rwkv(ids)
    assert torch.equal(a, b)
    with pytest.raises(VrwkvError, match="stored quantized as int8"):
        load_model(tmp_path / "int8", device="cpu", quant="int4")


@torch.no_grad()
def _first_answer_logits(vlm, data: Path) -> torch.Tensor:
    """[questions, vocab]: the logits of the first answer token for each shapes eval question."""
    from PIL import Image

    from vrwkv_core.data.conversation import encode_generation_prompt
    from vrwkv_core.tokenizer import default_tokenizer

    tok, rows = default_tokenizer(), []
    for line in (data / "eval" / "questions.jsonl").read_text().splitlines():
        q = json.loads(line)
        ids = torch.tensor([encode_generation_prompt(q["text"], tok, vlm.tokens_per_image)])
        with Image.open(data / "images" / q["image"]) as im:
            images = vlm.image_processor.batch([im.convert("RGB")])
        rows.append(vlm(ids, images, logits="last")[0][0, -1].float())
    return torch.stack(rows)


@pytest.mark.slow
def test_the_trained_tiny_model_answers_shapes_alike_in_every_format(tiny_trained, tmp_path):
    """Each format of the trained tiny model, loaded from its folder, stays near fp32's answer
    logits, and `vrwkv eval --quant` answers every question. Answers themselves are not compared:
    six steps a stage leave the first answer token a near-tie (top-2 gaps of 0.001-0.035 logits)."""
    from vrwkv_core.eval.generate import run_eval

    data, model = tiny_trained["data"], tiny_trained["finetune"]
    ref = _first_answer_logits(load_model(model, device="cpu", dtype=torch.float32), data)
    errs = {}
    for fmt, bound in BOUNDS.items():
        errs[fmt] = _rel(_first_answer_logits(load_model(model, device="cpu", quant=fmt), data), ref)
        assert errs[fmt] < bound, (fmt, errs[fmt])
        report = run_eval(str(model), "shapes", data, tmp_path / fmt, batch_size=4, device="cpu",
                          max_new_tokens=8, quant=fmt)  # fmt: skip
        assert (report.score.count, report.score.missing) == (24, 0) and len(report.merged.read_text().splitlines()) == 24
    print("first-answer logits, error against fp32 per format:", errs)
    assert 0 < errs["fp16"] < errs["int8"] < errs["int4"], errs  # each format really was applied


@torch.no_grad()
def test_vrwkv_export_quant_writes_a_dir_that_loads_quantized(tmp_path, capsys):
    from helpers import perturbed_vlm

    from vrwkv_cli.main import run
    from vrwkv_core.checkpoint.ours import save_pretrained
    from vrwkv_core.config import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    save_pretrained(perturbed_vlm(recipe.model, seed=0), tmp_path / "model", recipe)
    assert run(["export", str(tmp_path / "model"), "--quant", "int4", "--out", str(tmp_path / "q")]) == 0
    assert "int4 language model" in " ".join(capsys.readouterr().out.split())
    vlm = load_model(tmp_path / "q", device="cpu")
    assert vlm.rwkv.quant == "int4" and vlm.rwkv.blocks[0].att.key.fmt in ("int4", "int8")
    ref = load_model(tmp_path / "model", device="cpu", quant="int4")
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(vlm.rwkv(ids)[0], ref.rwkv(ids)[0])
    # --quant writes a dir: a .pth target is one clear error, nothing written
    assert run(["export", str(tmp_path / "model"), "--quant", "int8", "--out", str(tmp_path / "x.pth")]) == 2
    assert "--quant writes a model dir" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "x.pth").exists()


@pytest.mark.slow
def test_lm_bench_rows_for_formats_batch_and_memory():
    """run_lm_bench with quantized formats, a batch row and RSS, on a tiny config (in a child
    process: it imports the rwkv package, which reads its environment once)."""
    import os
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("rwkv")
    code = textwrap.dedent(
        """
        import json
        from vrwkv_core.bench.lm import run_lm_bench
        from vrwkv_core.config import RWKVSection
        cfg = RWKVSection(n_layer=2, n_embd=128, head_size=64, vocab_size=512)
        rows = run_lm_bench(threads=1, T=16, decode_tokens=3, repeats=1, cfg=cfg, quant=["fp16", "int4"], batch=2,
                            rss=True, quality_steps=4)
        print(json.dumps(rows))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    done = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True, timeout=600)
    rows = {(r["model"], r["phase"]): r for r in json.loads(done.stdout.strip().splitlines()[-1])}
    assert set(rows) == {(m, p) for m in ("vrwkv", "vrwkv-fp16", "vrwkv-int4", "rwkv-pkg") for p in ("prefill", "decode")} | {
        ("vrwkv-b2", "decode"), ("vrwkv-b2-packed", "decode")}  # fmt: skip
    assert rows[("vrwkv-fp16", "decode")]["logit_rel_err"] < 1e-2 and rows[("vrwkv-fp16", "decode")]["top1_agree"] == 1.0
    assert 0 < rows[("vrwkv-int4", "decode")]["logit_rel_err"] < 1.0
    for m in ("vrwkv", "vrwkv-fp16", "vrwkv-int4"):
        assert rows[(m, "decode")]["peak_rss_mb"] > rows[(m, "decode")]["lm_peak_mb"] > 0
    assert rows[("vrwkv-int4", "decode")]["bytes_per_token"] < rows[("vrwkv", "decode")]["bytes_per_token"]
