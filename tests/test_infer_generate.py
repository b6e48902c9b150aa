"""RNN-mode generation: state-carried decoding equals full forwards, stop rules, streaming, batching."""

from __future__ import annotations

import pytest
import torch

from helpers import build_tiny_vlm, rel
from vrwkv_core.infer.generate import (
    Generation,
    TextAssembler,
    decode_step,
    generate,
    generate_batch,
    generate_stream,
    prefill,
)
from vrwkv_core.infer.sampling import GenerationConfig


def _image_inputs(vlm, colors=("red",)):
    from PIL import Image

    return vlm.image_processor.batch([Image.new("RGB", (40, 30), c) for c in colors])


def _prompt(vlm, tok, question="What color is the square?", n_images=1):
    from vrwkv_core.data.conversation import encode_generation_prompt

    return encode_generation_prompt(question, tok, vlm.tokens_per_image, n_images=n_images)


def test_state_carried_logits_equal_full_forward(tiny_vlm, tokenizer):
    ids = _prompt(tiny_vlm, tokenizer)
    images = _image_inputs(tiny_vlm)
    cont = tokenizer.encode(" It is a red square on white.")
    logits, state = prefill(tiny_vlm, ids, images)
    steps = [logits]
    for t in cont[:-1]:
        logits, state = decode_step(tiny_vlm.rwkv, torch.tensor([t]), state)
        steps.append(logits)
    with torch.no_grad():
        full, _ = tiny_vlm(torch.tensor([ids + cont[:-1]]), images, logits="all")
    ref = full[0, len(ids) - 1 :]
    assert ref.shape[0] == len(steps)
    for i, step in enumerate(steps):
        assert rel(step[0], ref[i]) < 1e-4, i


def test_greedy_is_teacher_forced_argmax(tiny_vlm, tokenizer):
    ids = _prompt(tiny_vlm, tokenizer)
    images = _image_inputs(tiny_vlm)
    cfg = GenerationConfig(max_new_tokens=12, stop_tokens=())
    res = generate(tiny_vlm, tokenizer, ids, images, cfg)
    assert res.finish_reason == "length" and len(res.token_ids) == 12
    with torch.no_grad():
        full, _ = tiny_vlm(torch.tensor([ids + res.token_ids]), images, logits="all")
    expected = full[0, len(ids) - 1 : -1].argmax(-1).tolist()
    assert res.token_ids == expected
    assert res.text == tokenizer.decode(res.token_ids)
    assert res.n_fed == 11 and res.unfed_ids == res.token_ids[-1:]  # the last token is never fed
    # the result's state continues the sequence: feeding the unfed token gives the next logits
    logits, _ = decode_step(tiny_vlm.rwkv, torch.tensor(res.unfed_ids), res.state)
    with torch.no_grad():
        nxt, _ = tiny_vlm(torch.tensor([ids + res.token_ids]), images, logits="last")
    assert rel(logits[0], nxt[0, -1]) < 1e-4


def test_images_change_the_answer(tiny_vlm, tokenizer):
    ids = _prompt(tiny_vlm, tokenizer)
    cfg = GenerationConfig(max_new_tokens=6, stop_tokens=())
    a = generate(tiny_vlm, tokenizer, ids, _image_inputs(tiny_vlm, ["red"]), cfg).token_ids
    b = generate(tiny_vlm, tokenizer, ids, _image_inputs(tiny_vlm, ["blue"]), cfg).token_ids
    assert a != b


def test_stop_token_and_stop_string(tiny_vlm, tokenizer):
    ids = _prompt(tiny_vlm, tokenizer)
    images = _image_inputs(tiny_vlm)
    free = generate(tiny_vlm, tokenizer, ids, images, GenerationConfig(max_new_tokens=10, stop_tokens=()))
    seq = free.token_ids
    k = next(i for i in range(1, len(seq)) if seq[i] not in seq[:i])
    stopped = generate(tiny_vlm, tokenizer, ids, images, GenerationConfig(max_new_tokens=10, stop_tokens=(seq[k],)))
    assert stopped.finish_reason == "stop_token" and stopped.stop_token == seq[k]
    assert stopped.token_ids == seq[:k] and stopped.text == tokenizer.decode(seq[:k])

    text = free.text
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.find(needle)
    gen = generate_stream(tiny_vlm, tokenizer, ids, images, GenerationConfig(max_new_tokens=10, stop_tokens=(), stop_strings=(needle,)))
    pieces = list(gen)
    assert gen.result.finish_reason == "stop_string"
    assert "".join(pieces) == gen.result.text == text[:cut]


def test_max_new_tokens_zero(tiny_vlm, tokenizer):
    res = generate(tiny_vlm, tokenizer, _prompt(tiny_vlm, tokenizer), _image_inputs(tiny_vlm), max_new_tokens=0)
    assert res.token_ids == [] and res.text == "" and res.finish_reason == "length"


def test_text_assembler_holds_back_stop_prefixes(tokenizer):
    asm = TextAssembler(tokenizer, stop_strings=("END",))
    shown = []
    for piece in ["Hello E", "N", "D!"]:
        out, stopped = asm.push(tokenizer.encode(piece))
        shown.append(out)
    assert shown == ["Hello ", "", ""] and stopped and asm.emitted == "Hello "
    asm = TextAssembler(tokenizer, stop_strings=("END",))
    assert asm.push(tokenizer.encode("Hello E")) == ("Hello ", False)
    assert asm.push(tokenizer.encode("x")) == ("Ex", False)  # "E" is released once ruled out
    assert asm.finish() == ""


class ScriptedLM(torch.nn.Module):
    """A stand-in LM whose greedy output is a fixed id script (the state counts steps)."""

    def __init__(self, script: list[int], vocab: int = 65536) -> None:
        super().__init__()
        self.script, self.vocab = script, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, state=None, logits="last"):
        step = 0 if state is None else state
        out = torch.zeros(idx.shape[0], 1, self.vocab)
        out[:, 0, self.script[min(step, len(self.script) - 1)]] = 10.0
        return out, step + 1


def test_streaming_never_splits_utf8(tokenizer):
    text = "héllo 世界 🙂!"
    # one id per byte: every multi-byte character arrives in pieces
    script = [tokenizer.encode_bytes(bytes([b]))[0] for b in text.encode("utf-8")] + [261]
    assert all(len(tokenizer.idx_to_token[i]) == 1 for i in script[:-1])
    gen = generate_stream(ScriptedLM(script), tokenizer, [1], max_new_tokens=100)
    pieces = list(gen)
    assert "".join(pieces) == text == gen.result.text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) == len(text)  # one piece per completed character
    assert gen.result.finish_reason == "stop_token" and gen.result.stop_token == 261


def test_close_midway_keeps_a_consistent_result(tokenizer):
    script = tokenizer.encode("one two three four five six")
    gen = Generation(ScriptedLM(script), tokenizer, torch.nn.functional.one_hot(torch.tensor([script[0]]), 65536).float() * 10,
                     state=1, config=GenerationConfig(max_new_tokens=50))  # fmt: skip
    first = [next(gen), next(gen), next(gen)]
    res = gen.close()
    assert res.finish_reason == "interrupted" and res.text == "".join(first)
    assert res.token_ids == script[:3] and res.n_fed == 2 and res.state == 3  # 1 + 2 fed tokens
    assert gen.done and list(gen) == []


def test_batched_greedy_equals_one_by_one(tiny_vlm, tokenizer):
    questions = ["What color?", "Describe the picture in detail please.", "Shape?", "Is it big or small, and where?"]
    prompts = [_prompt(tiny_vlm, tokenizer, q, n_images=n) for q, n in zip(questions, [1, 1, 2, 0])]
    images = [_image_inputs(tiny_vlm, ["red"]), _image_inputs(tiny_vlm, ["green"]), _image_inputs(tiny_vlm, ["red", "blue"]), None]
    free = GenerationConfig(max_new_tokens=8, stop_tokens=())
    singles = [generate(tiny_vlm, tokenizer, p, im, free).token_ids for p, im in zip(prompts, images)]
    assert [r.token_ids for r in generate_batch(tiny_vlm, tokenizer, prompts, images, free, batch_size=3)] == singles
    # stop tokens taken from the singles make samples finish at different steps, so rows
    # drop out of the batch and queued prompts join it; one by one, greedy answers are
    # the free runs cut before their first stop token
    stops = (singles[0][2], singles[1][5], singles[3][1])
    expected = []
    for seq in singles:
        cut = next((i for i, t in enumerate(seq) if t in stops), len(seq))
        expected.append(seq[:cut])
    cfg = GenerationConfig(max_new_tokens=8, stop_tokens=stops)
    batched = generate_batch(tiny_vlm, tokenizer, prompts, images, cfg, batch_size=2)
    assert [b.token_ids for b in batched] == expected
    assert [b.text for b in batched] == [tokenizer.decode(e) for e in expected]
    assert [b.finish_reason for b in batched] == ["stop_token" if len(e) < 8 else "length" for e in expected]
    assert len({len(e) for e in expected}) > 1


@pytest.mark.gpu
def test_cuda_decoding_and_batching(tokenizer):
    vlm = build_tiny_vlm().cuda()
    ids = _prompt(vlm, tokenizer)
    images = _image_inputs(vlm)
    res = generate(vlm, tokenizer, ids, images, GenerationConfig(max_new_tokens=8, stop_tokens=()))
    with torch.no_grad():
        full, _ = vlm(torch.tensor([ids + res.token_ids]), images, logits="all")
    assert full[0, len(ids) - 1 : -1].argmax(-1).tolist() == res.token_ids
    prompts = [ids, _prompt(vlm, tokenizer, "Longer question about the picture?")]
    cfg = GenerationConfig(max_new_tokens=6, stop_tokens=())
    singles = [generate(vlm, tokenizer, p, images, cfg).token_ids for p in prompts]
    assert [r.token_ids for r in generate_batch(vlm, tokenizer, prompts, [images, images], cfg)] == singles
    vlm = vlm.to(torch.bfloat16)  # bf16 weights, fp32 WKV state: decoding follows the full forward
    logits, state = prefill(vlm, ids, images)
    for t in res.token_ids[:4]:
        logits, state = decode_step(vlm.rwkv, torch.tensor([t]), state)
    with torch.no_grad():
        ref, _ = vlm(torch.tensor([ids + res.token_ids[:4]]), images, logits="last")
    assert rel(logits[0], ref[0, -1]) < 0.05
