"""The serving engine without HTTP: batched admission, the batched greedy pick, rows leaving
the decode batch in place. A tiny random RWKV-7 stands in for a model."""

from __future__ import annotations

import queue
from dataclasses import replace

import pytest
import torch

from vrwkv_core.bench.lm import random_rwkv7_weights
from vrwkv_core.config import RWKVSection
from vrwkv_core.infer import DecodeBatch, GenerationConfig, prefill
from vrwkv_core.infer.batch import greedy_tokens
from vrwkv_core.infer.sampling import IMAGE_TOKEN_ID as IMAGE
from vrwkv_core.model.rwkv.rwkv7 import RWKV7
from vrwkv_core.serve.engine import Engine, EngineRequest, Finished, scheduler
from vrwkv_core.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def lm():
    cfg = RWKVSection(n_layer=2, n_embd=64, head_size=32, vocab_size=65536)
    return RWKV7.from_state_dict(random_rwkv7_weights(cfg, seed=3)).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(300, 20000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = GenerationConfig(max_new_tokens=6, temperature=0.0, stop_tokens=())
SAMPLED = GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=50, seed=5, stop_tokens=())


def answers(engine: Engine, prompts: list[list[int]], together: bool, configs=None) -> list[Finished]:
    """Answers to `prompts` (greedy unless `configs`): queued at once (the scheduler sees them
    together), or one after the other (each alone in the batch)."""
    streams = [queue.Queue() for _ in prompts]
    reqs = [
        EngineRequest(ids, cfg, events.put)
        for ids, cfg, events in zip(prompts, configs or [GREEDY] * len(prompts), streams)
    ]
    out = []
    if together:
        with engine._cv:  # re-entrant: the scheduler takes none of them before all are queued
            for req in reqs:
                engine.submit(req)
    for req, events in zip(reqs, streams):
        if not together:
            engine.submit(req)
        while not isinstance(ev := events.get(timeout=60), Finished):
            pass
        out.append(ev)
    return out


@pytest.fixture
def prefill_shapes(monkeypatch):
    """The [rows, tokens] of every prefill the scheduler runs."""
    shapes = []
    real = scheduler.prefill

    def spy(model, ids, images=None, state=None):
        t = torch.as_tensor(ids)
        shapes.append(tuple(t.shape) if t.dim() == 2 else (1, len(t)))
        return real(model, ids, images, state)

    monkeypatch.setattr(scheduler, "prefill", spy)
    return shapes


def test_requests_arriving_together_prefill_as_one_batch(lm, prefill_shapes):
    engine = Engine(lm, default_tokenizer(), max_batch=8)
    try:
        prompts = [prompt(6, 1), prompt(9, 2), prompt(6, 3), prompt(6, 4), prompt(9, 5)]
        configs = [GREEDY, GREEDY, SAMPLED, GREEDY, SAMPLED]  # seeded sampling rows beside greedy ones
        alone = answers(engine, prompts, together=False, configs=configs)
        assert prefill_shapes == [(1, 6), (1, 9), (1, 6), (1, 6), (1, 9)]
        prefill_shapes.clear()
        batched = answers(engine, prompts, together=True, configs=configs)
        assert sorted(prefill_shapes) == [(2, 9), (3, 6)]  # one prefill per tail length
        assert [a.text for a in batched] == [a.text for a in alone]
        assert [a.n_completion for a in batched] == [6] * 5
        greedy = answers(engine, [prompts[2], prompts[4]], together=True)
        assert [g.text for g in greedy] != [batched[2].text, batched[4].text]  # those rows really sampled
    finally:
        engine.close()


def test_prefill_budget_spreads_a_burst_over_turns(lm, prefill_shapes):
    engine = Engine(lm, default_tokenizer(), max_batch=8, prefill_budget=10)
    try:
        prompts = [prompt(6, 11), prompt(6, 12), prompt(6, 13)]
        done = answers(engine, prompts, together=True)
        assert prefill_shapes == [(1, 6), (1, 6), (1, 6)]  # 6 + 6 > 10: one request a turn
        assert [a.n_completion for a in done] == [6] * 3
    finally:
        engine.close()


def test_long_tails_prefill_in_chunks_between_decode_steps(lm, prefill_shapes, monkeypatch):
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 4)
    steps = []  # how many prefills had run at each decode step
    real_step = DecodeBatch.step

    def step(self, tokens):
        steps.append(len(prefill_shapes))
        real_step(self, tokens)

    monkeypatch.setattr(DecodeBatch, "step", step)
    engine = Engine(lm, default_tokenizer(), max_batch=8, prefill_budget=8)
    try:
        prompts = [prompt(10, 31), prompt(6, 32)]
        alone = answers(engine, prompts, together=False)
        assert prefill_shapes == [(1, 4), (1, 4), (1, 2), (1, 4), (1, 2)]  # chunks from each tail's start
        prefill_shapes.clear()
        together = answers(engine, prompts, together=True)
        # turn 1: both first chunks as one batch; turn 2: 4 of the first, the last 2 of the second; turn 3
        assert prefill_shapes == [(2, 4), (1, 4), (1, 2), (1, 2)]
        assert [a.text for a in together] == [a.text for a in alone]

        # a running row keeps decoding while a long tail is prefilled: a step after every chunk
        running = queue.Queue()
        engine.submit(EngineRequest(prompt(5, 33), replace(GREEDY, max_new_tokens=500), running.put))
        running.get(timeout=60)  # it is decoding
        prefill_shapes.clear()
        steps.clear()
        answers(engine, [prompt(21, 34)], together=True)
        assert prefill_shapes == [(1, 4)] * 5 + [(1, 1)]
        assert all(k in steps for k in range(1, 6))  # a decode step after each chunk but the last
    finally:
        engine.close()


def test_greedy_tokens_masks_each_rows_banned_tokens():
    logits = torch.tensor([[1.0, 5.0, 3.0, 0.0], [2.0, 2.0, 9.0, 9.5], [0.0, 4.0, 4.0, 1.0], [5.0, 5.0, 1.0, 0.0],
                           [0.0, 1.0, 7.0, 2.0]])  # fmt: skip
    # 1 banned -> 2; 3 banned (70000 is out of range) -> 2; a tie -> the first, 1; a banned token ties
    # the best one before it -> the other, 1; the best is not banned -> 2
    assert greedy_tokens(logits, [(1,), (3, 70000), (), (0,), (0, 1)]) == [2, 2, 1, 1, 2]
    assert logits[0, 1] == 5.0  # the caller's logits are not modified


def test_greedy_tokens_pick_what_each_rows_sampler_picks():
    from vrwkv_core.infer import Sampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 6, (12, 40), generator=g).float()  # many ties
    top = logits.argmax(-1).tolist()
    banned = [(), (top[1],), (top[2], 0, 39), (IMAGE,), *[(top[i], i) for i in range(4, 12)]]
    expected = [int(Sampler(GenerationConfig(temperature=0.0, banned_tokens=ban), 1, 40)(logits[i : i + 1])[0])
                for i, ban in enumerate(banned)]  # fmt: skip
    assert greedy_tokens(logits, banned) == expected


def test_decode_batch_remove_moves_rows_in_place(lm):
    batch = DecodeBatch(lm)
    for k in range(4):
        batch.add([f"r{k}"], *prefill(lm, prompt(5, 20 + k)))
    batch.step([7, 8, 9, 10])
    before = {k: (batch.row_state(k), batch.logits[i].clone()) for i, k in enumerate(batch.keys)}
    batch.remove(["r0", "r2"])
    assert batch.keys == ["r3", "r1"]  # the last row moved into the first hole
    assert batch.state.batch_size == 2 and batch.logits.shape[0] == 2
    for i, k in enumerate(batch.keys):
        state, logits = before[k]
        assert torch.equal(batch.logits[i], logits)
        after = batch.row_state(k)
        assert all(torch.equal(a, b) for part in ("att_shift", "wkv", "ffn_shift")
                   for a, b in zip(getattr(after, part), getattr(state, part)))  # fmt: skip
    # the moved rows step exactly as a batch built from them does
    fresh = DecodeBatch(lm)
    fresh.add(["r3", "r1"], torch.stack([before["r3"][1], before["r1"][1]]),
              type(before["r3"][0]).cat([before["r3"][0], before["r1"][0]]))  # fmt: skip
    batch.step([11, 12])
    fresh.step([11, 12])
    assert torch.equal(batch.logits, fresh.logits)
    batch.remove(["r3", "r1"])
    assert batch.keys == [] and batch.state is None
