"""RWKV-6 language model: parity with the `rwkv` package, decoding, odd-layer reversal, loading, init."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import check_half_checkpoint, check_lm_trains_and_checkpoints, rel

from vrwkv_core.bench.lm6 import random_rwkv6_weights
from vrwkv_core.bench.rwkv_pkg import rwkv_pkg_run
from vrwkv_core.config import RWKVSection
from vrwkv_core.errors import CheckpointError
from vrwkv_core.model.families import lm_config_from_state_dict
from vrwkv_core.model.rwkv.rwkv6 import RWKV6, LoraDims6, config_from_state_dict, reversal_order
from vrwkv_core.model.rwkv.state import RWKVState

TINY = RWKVSection(version="x060", n_layer=3, n_embd=128, head_size=64, vocab_size=1000)


@pytest.fixture(scope="module")
def tiny() -> RWKV6:
    return RWKV6.from_state_dict(random_rwkv6_weights(TINY, seed=3))


def ids_for(T: int, B: int = 1, seed: int = 0, vocab: int = TINY.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("n_embd", [128, 256])
def test_parity_with_rwkv_package(tmp_path: Path, n_embd: int) -> None:
    """Prefill 100 tokens then 32 greedy single-token steps: max|diff|/std <= 1e-4, same tokens."""
    pytest.importorskip("rwkv")
    cfg = RWKVSection(version="x060", n_layer=2, n_embd=n_embd, head_size=64, vocab_size=65536)
    path = tmp_path / "rand-x060.pth"
    torch.save(random_rwkv6_weights(cfg, seed=n_embd), path)
    prompt = ids_for(100, seed=n_embd, vocab=65536)[0].tolist()
    ref = rwkv_pkg_run(path, prompt, steps=32, threads=1)
    model = RWKV6.from_checkpoint(path)
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]))
        assert rel(logits[0], ref["prefill"]) <= 1e-4
        tokens, tok = [], int(logits[0, -1].argmax())
        for i in range(32):
            tokens.append(tok)
            step, state = model(torch.tensor([[tok]]), state=state)
            assert rel(step[0, 0], ref["steps"][i]) <= 1e-4, f"step {i}"
            tok = int(step[0, -1].argmax())
    assert tokens == ref["tokens"]
    assert len(set(tokens)) > 4  # the continuation is not degenerate


def test_decode_after_prefill_equals_full_forward(tiny: RWKV6) -> None:
    ids = ids_for(40, B=2, seed=1)
    with torch.no_grad():
        full, _ = tiny(ids)
        out, state = tiny(ids[:, :23], logits="last")
        assert rel(out[:, 0], full[:, 22]) < 1e-5
        mid, state = tiny(ids[:, 23:31], state=state)
        assert rel(mid, full[:, 23:31]) < 1e-5
        for t in range(31, 40):
            step, state = tiny(ids[:, t : t + 1], state=state)
            assert rel(step[:, 0], full[:, t]) < 1e-5


def test_reference_backend_agrees(tiny: RWKV6) -> None:
    ids = ids_for(37, B=2, seed=2)
    with torch.no_grad():
        a, sa = tiny(ids)
        b, sb = tiny(ids, backend="reference")
    assert rel(a, b) < 1e-5
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(sa.wkv, sb.wkv))


def test_odd_layer_reversal_semantics(tiny: RWKV6) -> None:
    """Spans reversed before every odd block and restored after it, by hand."""
    ids = ids_for(30, B=2, seed=4)
    spans = [(5, 17), [(2, 9), (20, 26)]]
    with torch.no_grad():
        got, _ = tiny(ids, reverse_spans=spans)
        plain, _ = tiny(ids)
        x = tiny.emb(ids)
        for i, block in enumerate(tiny.blocks):
            if i % 2:
                x = x.clone()
                x[0, 5:17] = x[0, 5:17].flip(0)
                x[1, 2:9], x[1, 20:26] = x[1, 2:9].flip(0), x[1, 20:26].flip(0)
            x = block(x, None, None, None, "auto")[0]
            if i % 2:
                x[0, 5:17] = x[0, 5:17].flip(0)
                x[1, 2:9], x[1, 20:26] = x[1, 2:9].flip(0), x[1, 20:26].flip(0)
        want = tiny.head(tiny.ln_out(x))
    assert rel(got, want) < 1e-5
    assert rel(got, plain) > 1e-2  # the reversal changes the function
    # rows before the first span see the same history either way
    assert rel(got[0, :5], plain[0, :5]) < 1e-5


def test_decoding_after_a_reversed_prefill_is_exact(tiny: RWKV6) -> None:
    """Prefill holding each span whole, then RNN steps == one forward with the same reversal."""
    ids = ids_for(36, B=2, seed=5)
    spans = [(3, 15), (6, 18)]
    with torch.no_grad():
        full, _ = tiny(ids, reverse_spans=spans)
        out, state = tiny(ids[:, :20], reverse_spans=spans)
        assert rel(out, full[:, :20]) < 1e-5
        more, state = tiny(ids[:, 20:27], state=state)  # text after the image: nothing reversed
        assert rel(more, full[:, 20:27]) < 1e-5
        for t in range(27, 36):
            step, state = tiny(ids[:, t : t + 1], state=state)
            assert rel(step[:, 0], full[:, t]) < 1e-5


def test_reversal_order_validation() -> None:
    order = reversal_order([(1, 4), None], batch=2, length=6)
    assert order.tolist() == [[0, 3, 2, 1, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert reversal_order([None, (2, 3)], batch=2, length=6) is None  # nothing to reverse
    with pytest.raises(ValueError, match="outside"):
        reversal_order([(4, 9)], batch=1, length=6)
    with pytest.raises(ValueError, match="overlaps"):
        reversal_order([[(0, 4), (3, 5)]], batch=1, length=6)
    with pytest.raises(ValueError, match="entries"):
        reversal_order([(0, 2)], batch=2, length=6)


def test_state_clone_batch_save_load(tiny: RWKV6, tmp_path: Path) -> None:
    ids = ids_for(12, B=2, seed=6)
    with torch.no_grad():
        _, state = tiny(ids)
        assert state.wkv[0].shape == (2, 2, 64, 64) and state.wkv[0].dtype == torch.float32
        state.save(tmp_path / "s.safetensors")
        loaded = RWKVState.load(tmp_path / "s.safetensors")
        nxt = torch.tensor([[7], [8]])
        a, _ = tiny(nxt, state=state)
        b, _ = tiny(nxt, state=loaded)
        c, _ = tiny(nxt[1:], state=state[1])
    assert torch.equal(a, b) and rel(c[0], a[1]) < 1e-6


def test_embeds_path_and_logit_modes(tiny: RWKV6) -> None:
    ids = ids_for(9, seed=7)
    with torch.no_grad():
        full, _ = tiny(ids)
        from_embeds, _ = tiny(embeds=tiny.emb(ids))
        last, _ = tiny(ids, logits="last")
        hidden, _ = tiny(ids, logits="hidden")
    assert torch.equal(full, from_embeds)
    assert last.shape == (1, 1, TINY.vocab_size) and rel(last[:, 0], full[:, -1]) < 1e-6
    assert hidden.shape == (1, 9, TINY.n_embd)
    with pytest.raises(ValueError, match="exactly one"):
        tiny()
    with pytest.raises(ValueError, match="logits must be"):
        tiny(ids, logits="first")


def test_safetensors_round_trip_and_dims(tiny: RWKV6, tmp_path: Path) -> None:
    tiny.save(tmp_path / "m.safetensors")
    again = RWKV6.from_checkpoint(tmp_path / "m.safetensors")
    assert again.cfg.n_layer == 3 and again.dim_ffn == 448 and again.lora == LoraDims6(32, 64)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("size", ["1b6", "3b", "7b"])
def test_layout_matches_released_rwkv6_world(reference_dir: Path, size: str) -> None:
    """The released VisualRWKV v6.0 LMs (RWKV-6 World names behind `rwkv.`): dims inferred
    from the names and shapes alone, and a meta model with exactly those tensors, in order."""
    with open(reference_dir / f"visualrwkv-v060-{size}.keys.tsv", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and r[0].startswith("rwkv.")]
    shapes = {name[len("rwkv."):]: tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
              for name, shape, _ in rows}  # fmt: skip
    sd = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    cfg, lora = config_from_state_dict(sd, size)
    assert lm_config_from_state_dict(sd, size) == (cfg, lora)
    model = RWKV6(cfg, lora, init=False)
    got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert list(got) == list(shapes) and got == shapes
    assert lora == LoraDims6.default(cfg.n_embd) and cfg.dim_ffn == int(3.5 * cfg.n_embd // 32 * 32)
    dims = {"1b6": (24, 2048), "3b": (32, 2560), "7b": (32, 4096)}[size]
    assert (cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab_size) == (*dims, 64, 65536)


def test_strict_loading_errors(tmp_path: Path) -> None:
    sd = random_rwkv6_weights(TINY, seed=0)
    for name, bad in {
        "missing": {k: v for k, v in sd.items() if k != "blocks.1.att.time_faaaa"},
        "unexpected": {**sd, "blocks.1.ln0.weight": torch.zeros(128)},
        "shape": {**sd, "head.weight": torch.zeros(999, 128)},
    }.items():
        torch.save(bad, tmp_path / f"{name}.pth")
        pattern = {"missing": "1 missing: blocks.1.att.time_faaaa", "unexpected": "1 unexpected: blocks.1.ln0.weight",
                   "shape": "wrong shape: head.weight"}[name]  # fmt: skip
        with pytest.raises(CheckpointError, match=pattern):
            RWKV6.from_checkpoint(tmp_path / f"{name}.pth")
    torch.save({"emb.weight": torch.zeros(4, 128), "blocks.0.att.r_k": torch.zeros(2, 64)}, tmp_path / "v7.pth")
    with pytest.raises(CheckpointError, match="not an RWKV-6") as err:
        RWKV6.from_checkpoint(tmp_path / "v7.pth")
    assert "RWKV-7" in (err.value.hint or "")
    with pytest.raises(ValueError, match="x060"):
        RWKV6(RWKVSection(version="x070", n_layer=1, n_embd=64, head_size=64, vocab_size=10))


def test_half_checkpoint_loads_and_bf16_runs(tmp_path: Path) -> None:
    check_half_checkpoint(RWKV6, random_rwkv6_weights(TINY, seed=6, dtype=torch.bfloat16), tmp_path / "half.pth",
                          ids_for(20, seed=6))


def test_fresh_model_init_and_training() -> None:
    cfg = RWKVSection(version="x060", n_layer=2, n_embd=128, head_size=64, vocab_size=300)
    torch.manual_seed(0)
    model = RWKV6(cfg)
    assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert float(model.blocks[0].att.output.weight.abs().sum()) == 0.0  # blocks start as identity
        decay = torch.exp(-torch.exp(model.blocks[0].att.time_decay))
    assert float(decay.min()) < 0.7 and float(decay.max()) > 0.99  # spread over channels
    check_lm_trains_and_checkpoints(model, reverse_spans=[(3, 12), (3, 12)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimize_for_inference_keeps_the_function(dtype: torch.dtype) -> None:
    model = RWKV6.from_state_dict(random_rwkv6_weights(TINY, seed=8), dtype=dtype)
    ids = ids_for(10, seed=8)
    with torch.no_grad():
        before, s1 = model(ids)
        step1, _ = model(ids[:, :1], state=s1)
        model.optimize_for_inference()
        after, s2 = model(ids)
        step2, _ = model(ids[:, :1], state=s2)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert rel(after, before) < tol and rel(step2, step1) < tol


def test_bench_rwkv6_rows_side_by_side_with_the_package() -> None:
    """`vrwkv bench lm --rwkv6 [--bf16]` rows, on a tiny shape: ours (fp32, bf16) and the
    rwkv package's, each phase with a ratio against the package and the fp32 greedy check."""
    from vrwkv_core.bench.lm6 import run_rwkv6_bench

    rows = run_rwkv6_bench(threads=1, T=12, decode_tokens=4, cfg=TINY, bf16=True)
    by = {(r["model"], r["phase"]): r for r in rows}
    assert set(by) == {(m, p) for m in ("vrwkv-rwkv6", "vrwkv-rwkv6-bf16", "rwkv-pkg-rwkv6")
                       for p in ("prefill", "decode")}  # fmt: skip
    for (model, phase), row in by.items():
        assert row["tokens_per_s"] > 0 and row["shape"] == "L3 C128"
        ref = by[("rwkv-pkg-rwkv6", phase)]["tokens_per_s"]
        assert row["ratio"] == pytest.approx(row["tokens_per_s"] / ref)
    assert by[("vrwkv-rwkv6", "decode")]["greedy_match"] is True
    assert "greedy_match" not in by[("vrwkv-rwkv6-bf16", "decode")]
