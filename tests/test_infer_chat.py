"""ChatSession: multi-turn equals one long forward, image-state cache, reset, save/load, bad images."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import rel
from vrwkv_core.data.conversation import encode_generation_prompt
from vrwkv_core.eval.benchmarks import SHORT_ANSWER
from vrwkv_core.errors import CheckpointError, DataError, VrwkvError
from vrwkv_core.infer.chat import ChatSession, ContextLengthWarning, image_key, load_image
from vrwkv_core.infer.generate import decode_step
from vrwkv_core.infer.sampling import GenerationConfig

CFG = GenerationConfig(max_new_tokens=4, stop_tokens=())


@pytest.fixture
def counting(tiny_vlm, monkeypatch):
    """Counts encode_images calls (the towers + projector) on the shared model."""
    calls = []
    original = tiny_vlm.encode_images

    def wrapped(images):
        calls.append(next(iter(images.values())).shape[0])
        return original(images)

    monkeypatch.setattr(tiny_vlm, "encode_images", wrapped)
    return calls


def _img(color: str, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_multi_turn_equals_one_long_forward(tiny_vlm, tokenizer):
    chat = ChatSession(tiny_vlm, tokenizer, config=CFG)
    chat.add_image(_img("red"))
    r1 = chat.ask("What color is it?").run()
    r2 = chat.ask("Are you sure?\n\n\nThink again.").run()  # blank lines collapse as in training
    chat.add_image(_img("blue"))  # an image in a later turn goes to its front
    r3 = chat.ask("And this one?").run()
    P = tiny_vlm.tokens_per_image
    first = encode_generation_prompt("What color is it?", tokenizer, P)
    pad = [261] * (-len(first) % 16)  # v7.00's pad of the first prefill (to a multiple of 16), and only there
    assert pad and (len(pad) + len(first)) % 16 == 0
    full = (pad + first + r1.token_ids + [261]
            + encode_generation_prompt("Are you sure?\nThink again.", tokenizer, P, n_images=0) + r2.token_ids + [261]
            + encode_generation_prompt("And this one?", tokenizer, P) + r3.token_ids)  # fmt: skip
    assert chat.n_tokens == len(full) + 1  # + the pending closing "\n\n"
    assert [t["role"] for t in chat.turns] == ["user", "assistant"] * 3
    images = tiny_vlm.image_processor.batch([_img("red"), _img("blue")])
    with torch.no_grad():
        logits, _ = tiny_vlm(torch.tensor([full]), images, logits="all")
    # every answer token is the argmax of the one long forward at its position
    pos = len(full) - len(r3.token_ids)
    assert logits[0, pos - 1 : -1].argmax(-1).tolist() == r3.token_ids
    # and the carried state continues the long sequence exactly
    nxt, _ = decode_step(tiny_vlm.rwkv, torch.tensor(r3.unfed_ids), r3.state)
    assert rel(nxt[0], logits[0, -1]) < 1e-4


def test_image_cache_skips_towers_and_gives_the_same_answer(tiny_vlm, tokenizer, counting):
    # unpadded: the cached post-image state then serves any question (with the pad, one whose pad matches)
    chat = ChatSession(tiny_vlm, tokenizer, config=CFG, prefill_pad=False)
    chat.add_image(_img("green"))
    first = chat.ask("Describe it.").run()
    assert counting == [1] and (chat.cache_hits, chat.cache_misses) == (0, 1)
    chat.reset()  # keeps the conversation's image queued, and the cache
    assert chat.queued_images == 1 and chat.turns == [] and chat.state is None
    again = chat.ask("Describe it.").run()
    assert counting == [1] and chat.cache_hits == 1  # no tower call the second time
    assert again.token_ids == first.token_ids
    other = chat.reset() or chat.ask("What shape?").run()
    fresh = ChatSession(tiny_vlm, tokenizer, config=CFG, cache_size=0, prefill_pad=False)
    fresh.add_image(_img("green"))
    assert fresh.ask("What shape?").run().token_ids == other.token_ids
    assert counting == [1, 1]  # the fresh session ran the towers, the cached one did not
    # the key is the content: an equal image made separately hits, a different one misses
    assert image_key(_img("green")) == image_key(_img("green").convert("RGBA"))
    chat.reset(keep_images=False)
    chat.add_image(_img("green"))
    chat.ask("Hi").close()
    chat.reset(keep_images=False)
    chat.add_image(_img("green", size=(30, 40)))
    chat.ask("Hi").close()
    assert counting == [1, 1, 1] and chat.cache_hits == 3


def test_retry_and_interrupted_answer(tiny_vlm, tokenizer):
    chat = ChatSession(tiny_vlm, tokenizer, config=GenerationConfig(max_new_tokens=6, stop_tokens=()))
    chat.add_image(_img("red"))
    gen = chat.ask("Tell me a story.")
    next(gen)
    partial = gen.close()
    assert partial.finish_reason == "interrupted" and chat.turns[-1] == {"role": "assistant", "text": partial.text}
    full = chat.retry().run()
    assert full.token_ids[: len(partial.token_ids)] == partial.token_ids and len(full.token_ids) == 6
    assert [t["role"] for t in chat.turns] == ["user", "assistant"]
    sampled = {tuple(chat.retry(temperature=1.0, seed=s).run().token_ids) for s in range(3)}
    assert len(sampled) > 1
    with pytest.raises(VrwkvError, match="nothing to retry"):
        ChatSession(tiny_vlm, tokenizer).retry()


def test_save_load_round_trip(tiny_vlm, tokenizer, tmp_path: Path):
    a = ChatSession(tiny_vlm, tokenizer, config=CFG)
    a.add_image(_img("red"))
    a.ask("What is it?").run()
    saved = tmp_path / "chat.safetensors"
    meta = a.save_state(saved)
    assert meta == tmp_path / "chat.json" and saved.is_file()
    n_saved = a.n_tokens
    expected = a.ask("Say more.").run().token_ids
    b = ChatSession(tiny_vlm, tokenizer, config=CFG)
    b.load_state(saved)
    assert b.turns == a.turns[:2] and b.n_tokens == n_saved
    assert b.ask("Say more.").run().token_ids == expected
    with pytest.raises(VrwkvError, match="nothing to save"):
        ChatSession(tiny_vlm, tokenizer).save_state(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        b.load_state(tmp_path / "missing.safetensors")
    (tmp_path / "chat.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not a conversation"):
        b.load_state(saved)


def test_context_warning_and_empty_prompt(tiny_vlm, tokenizer):
    chat = ChatSession(tiny_vlm, tokenizer, config=CFG, ctx_len=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chat.ask("Hello there").run()
        assert not [w for w in caught if issubclass(w.category, ContextLengthWarning)]
        chat.add_image(_img("red"))
        chat.ask("What is it?").run()  # 4 image rows + ~25 tokens: past 20, still answers
    assert [w for w in caught if issubclass(w.category, ContextLengthWarning)]
    assert chat.last_result is not None and len(chat.last_result.token_ids) == 4
    for empty in ("", "   ", "<image>"):
        with pytest.raises(VrwkvError, match="empty prompt"):
            chat.ask(empty)


def _png_with_size(path: Path, width: int, height: int) -> Path:
    """A tiny real PNG whose header claims width x height (a decompression-bomb stand-in)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_bad_images_are_clear_errors(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="pixels"):
        load_image(_png_with_size(tmp_path / "bomb.png", 40_000, 40_000))
    good = tmp_path / "ok.png"
    _img("red").save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    assert load_image(good).size == (40, 30)


@pytest.mark.parametrize("tamper, message", [
    (lambda t: {**t, "wkv.0": t["wkv.0"].to(torch.int32)}, "wkv.0 has dtype int32, expected float32"),
    (lambda t: {**t, "att_shift.1": t["att_shift.1"][:, :-1].contiguous()}, r"att_shift.1 has shape \(1, 63\)"),
    (lambda t: {**t, "ffn_shift.0": t["ffn_shift.0"] * float("nan")}, "ffn_shift.0 holds non-finite values"),
    (lambda t: {**{k: v for k, v in t.items() if k != "wkv.1"}}, "not an RNN state"),
])  # fmt: skip
def test_load_refuses_a_tampered_state(tiny_vlm, tokenizer, tmp_path: Path, tamper, message) -> None:
    from safetensors.torch import load_file, save_file

    chat = ChatSession(tiny_vlm, tokenizer, config=CFG)
    chat.add_image(_img("red"))
    chat.ask("What is it?").run()
    chat.save_state(tmp_path / "s.safetensors")
    tensors = load_file(str(tmp_path / "s.safetensors"))
    save_file(tamper(tensors), str(tmp_path / "s.safetensors"), metadata={"format": "vrwkv-rnn-state", "n_layer": "2"})
    other = ChatSession(tiny_vlm, tokenizer, config=CFG)
    with pytest.raises(CheckpointError, match=message):
        other.load_state(tmp_path / "s.safetensors")
    assert other.state is None  # nothing half-loaded


def test_first_prefill_is_padded_as_v7_did(tiny_vlm, tokenizer, monkeypatch):
    """v7.00 prepends (-T) mod 16 tokens 261 to a forward of T tokens: chat pads the first prefill
    of a conversation (cache key included), follow-ups continue unpadded; prefill_pad=False: none."""
    import vrwkv_core.infer.chat as chat_mod

    calls, original = [], chat_mod.prefill
    monkeypatch.setattr(chat_mod, "prefill", lambda vlm, ids, *a, **k: calls.append(list(ids)) or original(vlm, ids, *a, **k))
    P = tiny_vlm.tokens_per_image
    for pad_on in (True, False):
        calls.clear()
        chat = ChatSession(tiny_vlm, tokenizer, config=CFG, prefill_pad=pad_on)
        chat.add_image(_img("red"))
        r1 = chat.ask("What color is it?").run()
        chat.ask("Sure?").run()
        prompt = encode_generation_prompt("What color is it?", tokenizer, P)
        n_pad = (-len(prompt)) % 16 if pad_on else 0
        first = calls[0] + calls[1]  # split after the image (for the image-state cache)
        assert first == [261] * n_pad + prompt
        second = calls[2]
        assert second == r1.unfed_ids + [261] + encode_generation_prompt("Sure?", tokenizer, P, n_images=0)


def _recording_prefill(monkeypatch) -> list:
    """Records (ids, returned logits) of every prefill ChatSession runs."""
    import vrwkv_core.infer.chat as chat_mod

    calls, original = [], chat_mod.prefill

    def wrapped(vlm, ids, *args, **kwargs):
        logits, state = original(vlm, ids, *args, **kwargs)
        calls.append((list(ids), logits.clone()))
        return logits, state

    monkeypatch.setattr(chat_mod, "prefill", wrapped)
    return calls

def test_chat_middle_prompt_equals_eval_v6_and_one_prefill(tiny_v6, tokenizer, monkeypatch) -> None:
    """ChatSession with image_position middle feeds eval's v6 prompt ids (split after the
    image for the cache), and its logits equal one prefill of the whole prompt (reversal included)."""
    from PIL import Image

    from vrwkv_core.eval.questions import encode_prompt
    from vrwkv_core.infer.chat import ChatSession
    from vrwkv_core.infer.sampling import GenerationConfig

    calls = _recording_prefill(monkeypatch)
    chat = ChatSession(tiny_v6, tokenizer, config=GenerationConfig(max_new_tokens=3, stop_tokens=()))
    img = Image.new("RGB", (40, 30), "red")
    chat.add_image(img)
    q = f"What color is it?\n{SHORT_ANSWER}"
    chat.ask(q).run()
    want = encode_prompt(q, tokenizer, 16, style="v6")
    assert [t for ids, _ in calls for t in ids] == want
    assert calls[0][0] == tokenizer.encode("User: What color is it?\n") + [65535] * 16  # split after the image
    with torch.no_grad():
        full, _ = tiny_v6.prefill(torch.tensor([want]), tiny_v6.image_processor.batch([img]))
    assert torch.allclose(calls[-1][1], full, atol=1e-4)

def test_chat_middle_cache_keys_on_the_text_before_the_image(tiny_v6, tokenizer) -> None:
    """Two questions on one image with middle placement never share a cached state;
    questions with the same text before the image do (and answer as without a cache)."""
    from PIL import Image

    from vrwkv_core.infer.chat import ChatSession
    from vrwkv_core.infer.sampling import GenerationConfig

    vlm = tiny_v6
    cfg = GenerationConfig(max_new_tokens=4, stop_tokens=())
    img = Image.new("RGB", (40, 30), "red")
    cached = ChatSession(vlm, tokenizer, config=cfg)
    fresh = ChatSession(vlm, tokenizer, config=cfg, cache_size=0)

    def ask(chat, q):
        chat.reset(keep_images=False)
        chat.add_image(img)
        return chat.ask(q).run().token_ids

    questions = ["What color is it?", "Is it a circle?", f"What color is it?\n{SHORT_ANSWER}"]
    answers = [ask(cached, q) for q in questions]
    assert (cached.cache_misses, cached.cache_hits) == (2, 1)  # the third shares the first's pre-image text
    assert answers == [ask(fresh, q) for q in questions]
    assert answers[0] != answers[1]
