"""RWKV-7 language model: parity with the `rwkv` package, decoding, state, loading, init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import check_half_checkpoint, check_lm_trains_and_checkpoints, rel

from vrwkv_core.bench.lm import random_rwkv7_weights
from vrwkv_core.config import RWKVSection
from vrwkv_core.errors import CheckpointError
from vrwkv_core.model import RWKV7, LoraDims, RWKVState
from vrwkv_core.model.rwkv.rwkv7 import config_from_state_dict

TINY = RWKVSection(n_layer=3, n_embd=128, head_size=64, vocab_size=1000)


@pytest.fixture(scope="module")
def tiny() -> RWKV7:
    return RWKV7.from_state_dict(random_rwkv7_weights(TINY, seed=3))


# The rwkv package reads RWKV_V7_ON at import and switches torch's JIT settings globally,
# so it runs in a child process: prefill 100 tokens, then 32 greedy single-token steps.
_PKG_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    import torch
    from rwkv.model import RWKV
    path, prompt, steps, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    model = RWKV(model=path[: -len(".pth")], strategy="cpu fp32")
    logits, state = model.forward(prompt, None, full_output=True)
    rows, tokens, tok = [logits], [], int(logits[-1].argmax())
    for _ in range(steps):
        tokens.append(tok)
        logit, state = model.forward(tok, state)
        rows.append(logit[None])
        tok = int(logit.argmax())
    torch.save({"logits": torch.cat(rows), "tokens": tokens}, out)
    """
)


@pytest.mark.slow
def test_parity_with_rwkv_package(tmp_path: Path) -> None:
    pytest.importorskip("rwkv")
    cfg = RWKVSection(n_layer=3, n_embd=128, head_size=64, vocab_size=65536)
    path = tmp_path / "rand-x070.pth"
    torch.save(random_rwkv7_weights(cfg, seed=7), path)
    prompt = torch.randint(0, cfg.vocab_size, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    out = tmp_path / "pkg.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    subprocess.run(
        [sys.executable, "-c", _PKG_SCRIPT, str(path), json.dumps(prompt), "32", str(out)],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    ref = torch.load(out, weights_only=True)

    model = RWKV7.from_checkpoint(path)
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]))
        rows, tokens, tok = [logits[0]], [], int(logits[0, -1].argmax())
        for _ in range(32):
            tokens.append(tok)
            logit, state = model(torch.tensor([[tok]]), state=state)
            rows.append(logit[0])
            tok = int(logit[0, -1].argmax())
    ours = torch.cat(rows)
    assert ours.shape == ref["logits"].shape == (132, cfg.vocab_size)
    assert float(ref["logits"].std()) > 0.5  # not degenerate
    assert rel(ours[:100], ref["logits"][:100]) <= 1e-4
    assert rel(ours[100:], ref["logits"][100:]) <= 1e-4
    assert tokens == ref["tokens"]
    assert len(set(tokens)) > 4  # the continuation actually varies


def test_decode_after_prefill_equals_full_forward(tiny: RWKV7) -> None:
    ids = torch.randint(0, TINY.vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, full_state = tiny(ids)
        part, state = tiny(ids[:, :17])  # a chunk boundary + 1
        pieces = [part]
        more, state = tiny(ids[:, 17:37], state=state)  # a second prefill from a state
        pieces.append(more)
        for t in range(37, 45):
            step, state = tiny(ids[:, t : t + 1], state=state)
            pieces.append(step)
    assert rel(torch.cat(pieces, dim=1), full) <= 1e-5
    parts = ("wkv", "att_shift", "ffn_shift")
    for a, b in zip(*([t for p in parts for t in getattr(s, p)] for s in (state, full_state))):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_reference_backend_agrees(tiny: RWKV7) -> None:
    ids = torch.randint(0, TINY.vocab_size, (1, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        chunked, _ = tiny(ids)
        ref, _ = tiny(ids, backend="reference")
    assert rel(chunked, ref) <= 1e-5


def test_state_clone_batch_save_load(tiny: RWKV7, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, TINY.vocab_size, (2, 20), generator=gen)
    nxt = torch.randint(0, TINY.vocab_size, (2, 1), generator=gen)
    with torch.no_grad():
        _, state = tiny(ids)
        want, _ = tiny(nxt, state=state)
        # forward leaves its input state alone; clone is independent
        kept = state.clone()
        tiny(nxt, state=state)
        assert all(torch.equal(a, b) for a, b in zip(state.wkv, kept.wkv))
        kept.wkv[0].zero_()
        assert state.wkv[0].abs().sum() > 0
        # batching: rows run alone == rows of the batch, and cat/select/[i] are inverses
        _, s0 = tiny(ids[:1])
        _, s1 = tiny(ids[1:])
        both = RWKVState.cat([s0, s1])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(both.wkv, state.wkv))
        got, _ = tiny(nxt, state=both)
        assert rel(got, want) <= 1e-5
        assert torch.equal(state[1].wkv[2], state.select([1]).wkv[2])
        assert state.select([1, 0]).batch_size == 2 and state[0].batch_size == 1
        # an explicit zero state is the same as none
        zero = RWKVState.zeros(tiny, batch=2)
        assert zero.wkv[0].shape == (2, 2, 64, 64) and zero.att_shift[0].shape == (2, 128)
        assert torch.equal(tiny(ids, state=zero)[0], tiny(ids)[0])
        # save / load round trip
        state.save(tmp_path / "s.safetensors")
        loaded = RWKVState.load(tmp_path / "s.safetensors")
        again, _ = tiny(nxt, state=loaded)
    assert torch.equal(again, want)
    assert loaded.n_layer == TINY.n_layer and loaded.wkv[0].dtype == torch.float32
    (tmp_path / "bad.safetensors").write_bytes(b"not a state")
    with pytest.raises(CheckpointError):
        RWKVState.load(tmp_path / "bad.safetensors")


def test_embeds_path_and_logit_modes(tiny: RWKV7) -> None:
    ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = tiny(ids)
        via_embeds, _ = tiny(embeds=tiny.emb(ids))
        last, _ = tiny(ids, logits="last")
        hidden, _ = tiny(ids, logits="hidden")
    assert torch.equal(via_embeds, full)
    assert last.shape == (2, 1, TINY.vocab_size) and torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    assert hidden.shape == (2, 9, TINY.n_embd) and torch.allclose(tiny.head(hidden), full, atol=1e-5)
    with pytest.raises(ValueError):
        tiny(ids, embeds=tiny.emb(ids))
    with pytest.raises(ValueError):
        tiny(ids, logits="first")


def test_safetensors_round_trip_and_dims(tiny: RWKV7, tmp_path: Path) -> None:
    tiny.save(tmp_path / "m.safetensors")
    back = RWKV7.from_checkpoint(tmp_path / "m.safetensors")
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(back(ids)[0], tiny(ids)[0])
    cfg, lora = config_from_state_dict(tiny.state_dict())
    assert (cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab_size, cfg.dim_ffn) == (3, 128, 64, 1000, 512)
    assert lora == tiny.lora


def test_lora_widths_of_released_sizes() -> None:
    assert LoraDims.default(768) == LoraDims(64, 64, 32, 128)
    assert LoraDims.default(1024) == LoraDims(64, 64, 32, 160)
    assert LoraDims.default(2048) == LoraDims(96, 96, 64, 256)


def test_strict_loading_errors(tmp_path: Path) -> None:
    sd = random_rwkv7_weights(TINY, seed=0)
    for name, bad in {
        "missing": {k: v for k, v in sd.items() if k != "blocks.1.att.k_a"},
        "unexpected": {**sd, "blocks.0.att.v0": torch.zeros(1, 1, 128)},
        "shape": {**sd, "head.weight": torch.zeros(999, 128)},  # vocab differs from emb
    }.items():
        torch.save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=name if name != "shape" else "wrong shape.*head.weight"):
            RWKV7.from_checkpoint(tmp_path / f"{name}.pth")
    torch.save({"blocks.0.att.time_decay": torch.zeros(2)}, tmp_path / "v6.pth")
    with pytest.raises(CheckpointError, match="not an RWKV-7") as err:
        RWKV7.from_checkpoint(tmp_path / "v6.pth")
    assert "RWKV-6" in (err.value.hint or "")
    with pytest.raises(CheckpointError, match="not found"):
        RWKV7.from_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        RWKV7.from_checkpoint(tmp_path / "junk.pth")


def test_half_checkpoint_loads_and_bf16_runs(tmp_path: Path) -> None:
    ids = torch.randint(0, TINY.vocab_size, (1, 20), generator=torch.Generator().manual_seed(6))
    sd = random_rwkv7_weights(TINY, seed=6, dtype=torch.float16)  # released RWKV-7 files are fp16
    check_half_checkpoint(RWKV7, sd, tmp_path / "half.pth", ids)


def test_fresh_model_names_init_and_training() -> None:
    cfg = RWKVSection(n_layer=2, n_embd=128, head_size=64, vocab_size=300)
    torch.manual_seed(0)
    model = RWKV7(cfg)
    names = set(model.state_dict())
    att = "x_r x_w x_k x_v x_a x_g w0 w1 w2 a0 a1 a2 g1 g2 k_k k_a r_k receptance.weight key.weight " \
          "value.weight output.weight ln_x.weight ln_x.bias".split()  # fmt: skip
    want = {"emb.weight", "ln_out.weight", "ln_out.bias", "head.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"}
    for i in range(2):
        want |= {f"blocks.{i}.{ln}.{p}" for ln in ("ln1", "ln2") for p in ("weight", "bias")}
        want |= {f"blocks.{i}.att.{n}" for n in att}
        want |= {f"blocks.{i}.ffn.{n}" for n in ("x_k", "key.weight", "value.weight")}
    want |= {"blocks.1.att.v0", "blocks.1.att.v1", "blocks.1.att.v2"}
    assert names == want
    assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert float(model.blocks[0].att.output.weight.abs().sum()) == 0.0  # blocks start as identity
        w = torch.exp(-torch.exp(-torch.nn.functional.softplus(-model.blocks[0].att.w0) - 0.5))
    assert 0.545 < float(w.min()) < 0.6 and float(w.max()) > 0.99  # decays spread over their range

    # a few steps on a repeating sequence: the loss falls; grad checkpointing gives the same grads
    check_lm_trains_and_checkpoints(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimize_for_inference_keeps_the_function(dtype: torch.dtype) -> None:
    sd = random_rwkv7_weights(TINY, seed=8)
    base = RWKV7.from_state_dict(sd, dtype=dtype)
    fast = RWKV7.from_state_dict(sd, dtype=dtype).optimize_for_inference()
    ids = torch.randint(0, TINY.vocab_size, (2, 19), generator=torch.Generator().manual_seed(8))
    tol = 1e-5 if dtype == torch.float32 else 0.05
    if dtype == torch.float32:
        assert not fast.head.weight.is_contiguous()  # column-major storage
    elif torch.backends.mkldnn.is_available():
        assert fast.head._packed is not None and "w1" in fast.blocks[0].att._packed
    with torch.no_grad():
        want, s_want = base(ids)
        got, s_got = fast(ids)
        assert rel(got, want) <= tol
        assert rel(fast(ids[:, :1], state=s_got)[0], base(ids[:, :1], state=s_want)[0]) <= tol
        # a weight changed in place (as an optimizer step does) is seen at once
        for m in (base, fast):
            m.head.weight.mul_(-1.0)
            m.blocks[1].att.w1.mul_(0.5)
        assert rel(fast(ids)[0], base(ids)[0]) <= tol
    assert set(fast.state_dict()) == set(base.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), base.state_dict().values()))
    # and it still trains
    fast.train()
    logits, _ = fast(ids)
    logits.float().square().mean().backward()
    assert fast.head.weight.grad is not None and torch.isfinite(fast.head.weight.grad.float()).all()


def test_single_token_step_matches_kernel_path_with_grads(tiny: RWKV7) -> None:
    """Block.step (the decode path) against Block.forward at T=1 (the WKV kernel), values and grads."""
    gen = torch.Generator().manual_seed(9)
    block = tiny.blocks[1]
    x = torch.randn(2, 1, 128, generator=gen)
    v_first = torch.randn(2, 1, 128, generator=gen)
    shifts = torch.randn(2, 128, generator=gen), torch.randn(2, 128, generator=gen)
    S = torch.randn(2, 2, 64, 64, generator=gen) * 0.1
    results = []
    for path in ("forward", "step"):
        xi = x.clone().requires_grad_(True)
        Si = S.clone().requires_grad_(True)
        block.zero_grad()
        if path == "forward":
            out = block(xi, v_first, shifts[0], Si, shifts[1], "reference")
            y, S_new = out[0][:, 0], out[3]
        else:
            out = block.step(xi[:, 0], v_first[:, 0], shifts[0], Si, shifts[1])
            y, S_new = out[0], out[3]
        (y.square().sum() + S_new.square().sum()).backward()
        results.append((y.detach(), S_new.detach(), xi.grad, Si.grad, block.att.w1.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())


@pytest.mark.slow
def test_lm_bench_rows() -> None:
    """run_lm_bench on a tiny config (in a child process: it imports the rwkv package)."""
    pytest.importorskip("rwkv")
    code = textwrap.dedent(
        """
        import json
        from vrwkv_core.bench.lm import run_lm_bench
        from vrwkv_core.config import RWKVSection
        cfg = RWKVSection(n_layer=2, n_embd=128, head_size=64, vocab_size=512)
        rows = run_lm_bench(threads=1, T=20, decode_tokens=3, bf16=True, repeats=1, cfg=cfg)
        print(json.dumps(rows))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True, timeout=300
    )
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    got = {(r["model"], r["phase"]) for r in rows}
    assert got == {(m, p) for m in ("vrwkv", "vrwkv-bf16", "rwkv-pkg") for p in ("prefill", "decode")}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ratio"] > 0
        if r["phase"] == "decode":
            assert 0 < r["bandwidth_fraction"] and r["bytes_per_token"] > 0
    assert next(r for r in rows if r["model"] == "rwkv-pkg" and r["phase"] == "decode")["ratio"] == 1.0
