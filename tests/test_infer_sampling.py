"""Sampling: greedy, temperature/top-k/top-p statistics, penalties with decay, bans, config checks."""

from __future__ import annotations

import pytest
import torch

from vrwkv_core.errors import VrwkvError
from vrwkv_core.infer.sampling import GenerationConfig, Sampler, apply_penalties, sampling_probs

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
N = 40_000


def _freqs(cfg: GenerationConfig, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    sampler = Sampler(cfg, batch=N, vocab=logits.shape[-1])
    tokens = sampler(logits.expand(N, -1))
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / N


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    for seed in (None, 1):
        tokens = Sampler(GenerationConfig(seed=seed, banned_tokens=()), 5, 100)(logits)
        assert tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_frequencies(temperature):
    freqs = _freqs(GenerationConfig(temperature=temperature, seed=0, banned_tokens=()))
    expected = torch.softmax(LOGITS[0] / temperature, -1)
    assert (freqs - expected).abs().max() < 0.01


def test_top_k_support_and_frequencies():
    freqs = _freqs(GenerationConfig(temperature=1.0, top_k=3, seed=1, banned_tokens=()))
    top3 = [0, 5, 1]
    assert set(freqs.nonzero().view(-1).tolist()) == set(top3)
    expected = torch.softmax(LOGITS[0, top3], -1)
    assert (freqs[top3] - expected).abs().max() < 0.01


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = torch.softmax(LOGITS[0], -1)  # sorted: 0 (.37), 5 (.22), 1 (.14), 2 (.08), 3 (.05), 4 (.02)
    order = p.argsort(descending=True).tolist()
    mass = p[order].cumsum(0)
    top_p = float(mass[2]) - 0.01  # needs exactly the top three
    freqs = _freqs(GenerationConfig(temperature=1.0, top_p=top_p, seed=2, banned_tokens=()))
    keep = order[:3]
    assert set(freqs.nonzero().view(-1).tolist()) == set(keep)
    assert (freqs[keep] - p[keep] / p[keep].sum()).abs().max() < 0.01
    # a tiny top_p keeps only the most likely token
    probs = sampling_probs(LOGITS, GenerationConfig(temperature=1.0, top_p=1e-6))
    assert probs[0].tolist() == [1.0, 0, 0, 0, 0, 0]


def test_same_seed_same_draws_different_seed_different():
    cfg = GenerationConfig(temperature=1.0, seed=7, banned_tokens=())
    logits = torch.zeros(64, 1000)
    a, b = Sampler(cfg, 64, 1000)(logits), Sampler(cfg, 64, 1000)(logits)
    c = Sampler(cfg.with_options(seed=8), 64, 1000)(logits)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_banned_tokens_never_drawn():
    freqs = _freqs(GenerationConfig(temperature=1.0, banned_tokens=(0, 5), seed=3))
    assert freqs[0] == 0 and freqs[5] == 0
    assert Sampler(GenerationConfig(banned_tokens=(0,)), 1, 6)(LOGITS).item() == 5


def test_penalties_with_decay_match_hand_computation():
    cfg = GenerationConfig(presence_penalty=0.4, frequency_penalty=0.3, penalty_decay=0.5, banned_tokens=())
    V = 6
    sampler = Sampler(cfg, 1, V)
    for token in (2, 2, 5):  # force the choices with large logits
        forced = torch.full((1, V), -50.0)
        forced[0, token] = 50.0
        assert sampler(forced).item() == token
    # counts: after 2 -> {2: 1}; after 2 -> {2: 0.5 + 1}; after 5 -> {2: 0.75, 5: 1}
    counts = torch.zeros(V)
    counts[2], counts[5] = 0.75, 1.0
    assert torch.allclose(sampler.counts[0], counts)
    expected = LOGITS[0].clone()
    expected[2] -= 0.4 + 0.3 * 0.75
    expected[5] -= 0.4 + 0.3 * 1.0
    got = apply_penalties(LOGITS, sampler.counts, sampler.seen, cfg)
    assert torch.allclose(got[0], expected)
    # and they change the choice: token 0 is the argmax, penalised it loses to token 5
    greedy = Sampler(GenerationConfig(frequency_penalty=1.0, banned_tokens=()), 1, V)
    assert [greedy(LOGITS).item() for _ in range(3)] == [0, 5, 0]


def test_penalties_shift_sampling_frequencies():
    cfg = GenerationConfig(temperature=1.0, presence_penalty=1.0, seed=4, banned_tokens=())
    sampler = Sampler(cfg, N, 6)
    sampler.seen[:, 0] = True  # as if token 0 had been generated
    tokens = sampler(LOGITS.expand(N, -1))
    freqs = torch.bincount(tokens, minlength=6).float() / N
    shifted = LOGITS[0].clone()
    shifted[0] -= 1.0
    assert (freqs - torch.softmax(shifted, -1)).abs().max() < 0.01


def test_select_and_extend_keep_rows_aligned():
    sampler = Sampler(GenerationConfig(frequency_penalty=1.0, banned_tokens=()), 3, 4)
    sampler.counts[:, :] = torch.tensor([[1.0], [2.0], [3.0]])
    sampler.select([2, 0])
    assert sampler.counts[:, 0].tolist() == [3.0, 1.0]
    sampler.extend(1)
    assert sampler.counts.shape == (3, 4) and sampler.counts[2].sum() == 0


@pytest.mark.parametrize(
    "options, words",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"stop_strings": ("",)}, "stop_strings"),
    ],
)
def test_bad_config_values_are_clear_errors(options, words):
    with pytest.raises(VrwkvError, match=words):
        GenerationConfig(**options)


def test_unknown_option_is_named():
    with pytest.raises(VrwkvError, match="temprature"):
        GenerationConfig().with_options(temprature=1.0)
    cfg = GenerationConfig(stop_strings=["###"], stop_tokens=[261])
    assert cfg.stop_strings == ("###",) and cfg.stop_tokens == (261,)
