"""The blocked head cross-entropy (`kernels.head_loss`) against the plain logits + F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vrwkv_core.kernels.head_loss as head_loss
from vrwkv_core.kernels.head_loss import linear_cross_entropy
from vrwkv_core.train.module import sequence_loss


def _both(N: int, V: int, C: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=gen, dtype=dtype)
    weight = torch.randn(V, C, generator=gen, dtype=dtype) * 0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[: N // 3] = targets[0]  # repeated targets: their weight rows get several updates
    scale = torch.rand(N, generator=gen, dtype=dtype)  # per-row loss weights, as the per-sample mean gives
    out = []
    for fn in (linear_cross_entropy, lambda h, w, t: F.cross_entropy(h @ w.T, t, reduction="none")):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        ce = fn(h, w, targets)
        (ce * scale).sum().backward()
        out.append((ce.detach(), h.grad, w.grad))
    return out


@pytest.mark.parametrize("N,V,C,block", [(1, 3000, 8, 1 << 10), (37, 5000, 16, 1 << 12), (200, 4099, 32, 1 << 19), (5, 70, 4, 1 << 10)])
def test_blocked_cross_entropy_matches_the_plain_one_in_float64(N, V, C, block, monkeypatch):
    # block sizes that split the vocabulary unevenly (V not a multiple of the block), and one block
    monkeypatch.setattr(head_loss, "CPU_BLOCK_ELEMENTS", block)
    seed = torch.randint(0, 2**31, ()).item()  # a fresh seed each run, printed on failure
    (ce, gh, gw), (ce0, gh0, gw0) = _both(N, V, C, torch.float64, seed)
    assert torch.allclose(ce, ce0, rtol=1e-12, atol=1e-12), seed
    assert torch.allclose(gh, gh0, rtol=1e-10, atol=1e-12), seed
    assert torch.allclose(gw, gw0, rtol=1e-10, atol=1e-12), seed


def test_blocked_cross_entropy_in_float32_and_bfloat16():
    (ce, gh, gw), (ce0, gh0, gw0) = _both(64, 9000, 32, torch.float32, 3)
    assert torch.allclose(ce, ce0, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gh, gh0, rtol=1e-4, atol=1e-6) and torch.allclose(gw, gw0, rtol=1e-4, atol=1e-6)
    (ce, gh, gw), (ce0, gh0, gw0) = _both(64, 9000, 32, torch.bfloat16, 3)
    assert gh.dtype == gw.dtype == torch.bfloat16 and ce.dtype == torch.float32
    assert torch.allclose(ce, ce0.float(), rtol=2e-2, atol=2e-2)
    assert (gh.float() - gh0.float()).norm() < 2e-2 * gh0.float().norm()
    assert (gw.float() - gw0.float()).norm() < 2e-2 * gw0.float().norm()


def test_under_autocast_the_products_are_bf16_and_the_gradients_reach_fp32_weights():
    torch.manual_seed(4)
    hidden, weight = torch.randn(16, 32, requires_grad=True), torch.randn(3000, 32, requires_grad=True)
    targets = torch.randint(0, 3000, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce = linear_cross_entropy(hidden, weight, targets)
        ce0 = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")  # what head(x).float() gives
    ce.sum().backward()
    gh, gw = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    ce0.sum().backward()
    assert gh.dtype == gw.dtype == torch.float32
    assert torch.allclose(ce, ce0, rtol=2e-2, atol=2e-2)
    assert (gh - hidden.grad).norm() < 2e-2 * hidden.grad.norm() and (gw - weight.grad).norm() < 2e-2 * weight.grad.norm()


def test_only_the_gradients_asked_for_are_made():
    hidden, weight = torch.randn(4, 8), torch.randn(2000, 8, requires_grad=True)
    linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 1999])).sum().backward()
    assert weight.grad is not None and hidden.grad is None
    h = torch.randn(4, 8, requires_grad=True)
    linear_cross_entropy(h, torch.randn(2000, 8), torch.tensor([0, 0, 5, 6])).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_sequence_loss_takes_the_blocked_path_only_for_a_plain_head(monkeypatch):
    calls = []
    real = head_loss.linear_cross_entropy
    monkeypatch.setattr("vrwkv_core.train.module.linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    hidden, labels = torch.randn(2, 5, 8), torch.tensor([[-100, 3, 4, -100, -100], [-100, 1, 2, 5, 6]])
    plain = torch.nn.Linear(8, 13, bias=False)

    class Wrapped(torch.nn.Linear):  # e.g. an adapter around the head: called as a module
        pass

    wrapped = Wrapped(8, 13, bias=False)
    wrapped.weight.data.copy_(plain.weight.data)
    a, _ = sequence_loss(hidden, labels, plain)
    assert len(calls) == 1
    b, _ = sequence_loss(hidden, labels, wrapped)
    assert len(calls) == 1 and torch.allclose(a, b, atol=1e-6)
