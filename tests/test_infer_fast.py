"""Fast decoding paths: batch-independent greedy answers (every weight format), the optional
fla WKV backend (a clear error without it), CUDA-graph decoding (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from vrwkv_core import RWKV7, quantize
from vrwkv_core.bench.lm import random_rwkv7_weights
from vrwkv_core.config import RWKVSection
from vrwkv_core.errors import VrwkvError
from vrwkv_core.infer.cuda_graph import CudaGraphDecoder, enable_cuda_graphs
from vrwkv_core.infer.generate import decode_step
from vrwkv_core.kernels import wkv7
from vrwkv_core.kernels.wkv7 import fla
from vrwkv_core.model.rwkv import layers

CFG = RWKVSection(n_layer=2, n_embd=128, head_size=64, vocab_size=300)


def _greedy(lm, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens [B, steps] of each row decoded together."""
    out, state = lm(prompts, logits="last")
    tokens, seq = out[:, -1].argmax(-1), []
    for _ in range(steps):
        seq.append(tokens)
        logits, state = decode_step(lm, tokens, state)
        tokens = logits.argmax(-1)
    return torch.stack(seq, 1)


@pytest.mark.parametrize("fmt", [None, "fp16", "int8", "int4"])
@torch.no_grad()
def test_greedy_rows_decode_the_same_alone_and_in_a_batch(fmt):
    lm = RWKV7.from_state_dict(random_rwkv7_weights(CFG, seed=2)).eval().optimize_for_inference()
    if fmt:
        quantize(lm, fmt)
    prompts = torch.randint(0, 300, (4, 6), generator=torch.Generator().manual_seed(0))
    together = _greedy(lm, prompts, 12)
    alone = torch.cat([_greedy(lm, prompts[i : i + 1], 12) for i in range(4)])
    assert torch.equal(together, alone)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (CPU fp32 packed route)")
@torch.no_grad()
def test_the_packed_route_gives_a_row_the_same_bits_at_any_batch_size():
    lm = RWKV7.from_state_dict(random_rwkv7_weights(CFG, seed=3)).eval().optimize_for_inference()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = torch.randint(0, 300, (9, 6), generator=torch.Generator().manual_seed(1))
        _, state = lm(ids[:, :5])
        mkl = [decode_step(lm, ids[:b, 5], state.select(list(range(b))))[0][0] for b in (1, 9)]
        assert not lm.batched_route
        lm.use_batched_route()
        assert lm.batched_route
        rows = [decode_step(lm, ids[:b, 5], state.select(list(range(b)))) for b in (1, 2, 3, 9)]
    finally:
        torch.set_num_threads(old)
    assert rows[0][1].batch_size == 1  # the lone row ran as two; one row of state comes back
    for logits, _ in rows[1:]:
        assert torch.equal(logits[0], rows[0][0][0])
    torch.testing.assert_close(rows[0][0][0], mkl[0], rtol=0, atol=1e-4)  # the same model either way


@torch.no_grad()
def test_a_one_row_fp32_step_on_two_torch_threads_runs_numpy_products_on_two_blas_threads(monkeypatch):
    lm = RWKV7.from_state_dict(random_rwkv7_weights(CFG, seed=4)).eval().optimize_for_inference()
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    old = torch.get_num_threads()
    seen = []
    real = layers.rowvec_mm
    monkeypatch.setattr(layers, "rowvec_mm", lambda x, rv: seen.append((torch.get_num_threads(), layers._blas_threads)) or real(x, rv))
    try:
        torch.set_num_threads(1)
        _, state = lm(ids[:, :5])
        one, _ = lm(ids[:, 5:], state=state)
        assert seen and set(seen) == {(1, 1)}  # the head and the block matrices, one BLAS thread
        seen.clear()
        torch.set_num_threads(2)
        two, _ = lm(ids[:, 5:], state=state)
        assert seen and set(seen) == {(1, 2)}  # torch on one thread, BLAS on the caller's two
        assert torch.get_num_threads() == 2  # restored
        seen.clear()
        lm(ids[:, :5])  # prefill is not a step: MKL on two threads
        lm(ids.expand(2, -1)[:, 5:], state=state.select([0, 0]))  # nor are two rows
        assert not seen and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-5)  # the same function


@torch.no_grad()
def test_a_one_row_quantized_step_on_two_threads_runs_only_its_kernels_on_two():
    lm = quantize(RWKV7.from_state_dict(random_rwkv7_weights(CFG, seed=5)).eval(), "int8").optimize_for_inference()
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(3))
    seen = []
    for m in lm.modules():
        if getattr(m, "_fn", None) is not None:
            m._fn = (lambda fn: lambda x: seen.append(torch.get_num_threads()) or fn(x))(m._fn)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, state = lm(ids[:, :5])
        one, _ = lm(ids[:, 5:], state=state)
        seen.clear()
        torch.set_num_threads(2)
        two, _ = lm(ids[:, 5:], state=state)
        assert seen and set(seen) == {2} and torch.get_num_threads() == 2
        assert layers._kernel_threads == 0  # the step is over
        batch, _ = lm(ids.expand(3, -1)[:, 5:], state=state.select([0, 0, 0]))  # all on two threads
        assert torch.equal(batch[:1], two)  # a row's bits do not depend on its batch
    finally:
        torch.set_num_threads(old)
    assert ((two - one).norm() / one.norm()) < 5e-2  # fp16 LoRA copies against fp32 numpy rows: ~1e-2 here


def test_the_fla_backend_is_lazy_and_its_absence_one_clear_error():
    x = torch.zeros(1, 2, 1, 64)
    if not fla.is_available():
        with pytest.raises(VrwkvError, match="needs flash-linear-attention"):
            fla._chunk_rwkv7()
    with pytest.raises(VrwkvError, match="CUDA tensors only"):
        wkv7(x, x - 0.1, x, x, x, x, backend="fla")
    assert "fla" in RWKV7.wkv_backends


def test_cuda_graphs_change_nothing_on_cpu():
    lm = RWKV7.from_state_dict(random_rwkv7_weights(CFG)).eval()
    assert enable_cuda_graphs(lm) is None and "cuda_graphs" not in lm.__dict__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_graph_decode_equals_eager_decode_on_gpu():
    lm = RWKV7.from_state_dict(random_rwkv7_weights(CFG), device="cuda", dtype=torch.float32).eval()
    prompts = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(0)).cuda()
    eager = _greedy(lm, prompts, 8)
    assert isinstance(enable_cuda_graphs(lm), CudaGraphDecoder)
    graph = _greedy(lm, prompts, 8)
    assert torch.equal(graph, eager) and 3 in lm.cuda_graphs.graphs
