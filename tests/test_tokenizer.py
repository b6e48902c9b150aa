"""The World tokenizer: ids identical to the `rwkv` package's trie tokenizer, safe decoding."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrwkv_core.tokenizer import RWKVTokenizer, _parse_vocab

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")


@pytest.fixture(scope="module")
def reference():
    import rwkv

    vocab = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
    return rwkv_tokenizer.TRIE_TOKENIZER(str(vocab))


def _corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pieces = [
        "User: What is in the image?\n\nAssistant:", "你好，世界。", "こんにちは", "🎉🐈‍⬛👍🏽", "\r\n", "\t\t",
        "\x00\x01\x1b", "aaaaaaaaaaaaaaaaaaaaaaaa", " " * 200, "-" * 90, "naïve café", "ﬁ", "\u200b", "😀" * 5,
        "The quick brown fox", "1234567890", "```python\nprint(1)\n```", "<image>", "\n\n\n",
    ]
    out = []
    for _ in range(n):
        parts = [rng.choice(pieces) for _ in range(rng.randint(0, 8))]
        parts.append("".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(0, 12))))
        rng.shuffle(parts)
        out.append("".join(parts).encode("utf-8", "replace").decode("utf-8", "replace"))
    return out


def test_vocab_size_and_known_ids(tokenizer):
    assert len(tokenizer.idx_to_token) == 65529
    assert tokenizer.encode("\n\n") == [261]
    assert tokenizer.encode("Assistant:") == [5585, 41693, 59]
    assert tokenizer.encode("") == []


def test_matches_reference_on_generated_corpus(tokenizer, reference):
    for text in _corpus(seed=random.randrange(1 << 30), n=2000):
        assert tokenizer.encode(text) == reference.encode(text), repr(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_matches_reference_hypothesis(text):
    ref = _ref_singleton()
    tok = _tok_singleton()
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == text


_CACHE: dict[str, object] = {}


def _ref_singleton():
    if "ref" not in _CACHE:
        import rwkv

        _CACHE["ref"] = rwkv_tokenizer.TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    return _CACHE["ref"]


def _tok_singleton():
    from vrwkv_core.tokenizer import default_tokenizer

    return default_tokenizer()


def test_decode_never_raises_on_split_characters(tokenizer):
    ids = tokenizer.encode("猫🐈")
    byte_ids = [i for i in range(1, 257)]
    for cut in range(len(ids) + 1):
        tokenizer.decode(ids[:cut])
    assert "\ufffd" in tokenizer.decode([tokenizer.encode_bytes(b"\xe7")[0]])
    tokenizer.decode(byte_ids)
    assert tokenizer.decode([0, 65535]) == ""


def test_stream_decoder_yields_whole_characters(tokenizer):
    text = "猫は🐈です. ok"
    ids = tokenizer.encode_bytes(text.encode("utf-8"))
    # force byte-level ids so characters are split across ids
    byte_ids = [tokenizer.encode_bytes(bytes([b]))[0] for b in text.encode("utf-8")]
    for seq in (ids, byte_ids):
        dec = tokenizer.stream_decoder()
        pieces = [dec.feed([i]) for i in seq] + [dec.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_vocab_parsing_errors_name_the_line():
    with pytest.raises(ValueError, match="vocab.txt:2"):
        _parse_vocab("1 'a' 1\n2 'bc' 5\n", "vocab.txt")
    with pytest.raises(ValueError, match="vocab.txt:1"):
        _parse_vocab("1 __import__('os') 1\n", "vocab.txt")


def test_custom_vocab_file(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("1 'a' 1\n2 'b' 1\n3 'ab' 2\n", encoding="utf-8")
    tok = RWKVTokenizer(path)
    assert tok.encode("abab") == [3, 3] and tok.encode("ba") == [2, 1]
