"""The v7.00 template: ids and labels pinned against the `rwkv` package's own tokenizer.

Expected ids are built by tokenising each piece of the template independently with
`rwkv.rwkv_tokenizer.TRIE_TOKENIZER`, so they do not depend on our tokenizer or encoder.
"""

from __future__ import annotations

import os

import pytest

from vrwkv_core.data.conversation import (
    IMAGE_TOKEN_ID,
    encode_conversation,
    encode_conversation_info,
    encode_generation_prompt,
    normalize_turn_text,
)
from vrwkv_core.errors import DataError

TPI = 4  # tokens per image, small for readable tests
IMG = [IMAGE_TOKEN_ID] * TPI
M = -100


@pytest.fixture(scope="module")
def trie():
    mod = pytest.importorskip("rwkv.rwkv_tokenizer")
    import rwkv

    return mod.TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def tok():
    from vrwkv_core.tokenizer import RWKVTokenizer

    return RWKVTokenizer()


def gpt_turn(trie, answer: str) -> tuple[list[int], list[int]]:
    ids = trie.encode(f"Assistant: {answer}\n\n")
    return ids, [M, M, M] + ids[3:]


def test_literal_ids_of_template_pieces(tok):
    ids, labels = encode_conversation([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}], tok, TPI)
    assert ids == [24281, 59, 4571, 261, 5585, 41693, 59, 22796, 261]  # User: hi\n\nAssistant: yes\n\n
    assert labels == [M, M, M, M, M, M, M, 22796, 261]


def test_single_image_marker_moves_to_front(tok, trie):
    conv = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."}]
    human = trie.encode("User: ") + IMG + trie.encode("\nWhat is this?\n\n")
    g_ids, g_labels = gpt_turn(trie, "A cat.")
    ids, labels = encode_conversation(conv, tok, TPI)
    assert ids == human + g_ids
    assert labels == [M] * len(human) + g_labels
    # the marker already in front gives the same ids
    conv[0]["value"] = "<image>\nWhat is this?"
    assert encode_conversation(conv, tok, TPI)[0] == ids


def test_multi_turn_two_images_and_blank_lines(tok, trie):
    conv = [
        {"from": "human", "value": "<image>\nCompare these.\n\n\n  \nBe brief.\n<image>"},
        {"from": "gpt", "value": "Left is red.\n\n\nRight is blue."},
        {"from": "Human", "value": "  Which is bigger?  "},
        {"from": "gpt", "value": "The left one."},
    ]
    h1 = trie.encode("User: ") + IMG + trie.encode("\n") + IMG + trie.encode("\nCompare these.\nBe brief.\n\n")
    g1, g1l = gpt_turn(trie, "Left is red.\nRight is blue.")
    h2 = trie.encode("User: Which is bigger?\n\n")
    g2, g2l = gpt_turn(trie, "The left one.")
    ids, labels = encode_conversation(conv, tok, TPI)
    assert ids == h1 + g1 + h2 + g2
    assert labels == [M] * len(h1) + g1l + [M] * len(h2) + g2l
    assert ids.count(IMAGE_TOKEN_ID) == 2 * TPI
    # each answer ends with the stop token 261, which is learned
    assert [x for x in labels if x != M][-1] == 261


def test_text_only(tok, trie):
    conv = [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}]
    h = trie.encode("User: Say hello.\n\n")
    g, gl = gpt_turn(trie, "Hello!")
    assert encode_conversation(conv, tok, TPI) == (h + g, [M] * len(h) + gl)


def test_truncation_never_cuts_inside_an_image(tok):
    conv = [
        {"from": "human", "value": "<image>\n<image>\nDescribe both images in detail please."},
        {"from": "gpt", "value": "Two pictures of something quite long to describe."},
    ]
    full = encode_conversation_info(conv, tok, TPI)
    assert (full.n_images, full.n_images_kept, full.truncated) == (2, 2, False)
    first = full.input_ids.index(IMAGE_TOKEN_ID)
    second = first + TPI + 1  # "\n" between the two runs
    assert full.input_ids[second : second + TPI] == IMG
    # a cut inside the second image's run moves back to its start
    enc = encode_conversation_info(conv, tok, TPI, ctx_len=second + 2)
    assert enc.input_ids == full.input_ids[:second]
    assert (enc.n_images_kept, enc.truncated, enc.n_tokens_full) == (1, True, len(full.input_ids))
    # every ctx_len keeps whole images only
    for ctx in range(1, len(full.input_ids) + 2):
        e = encode_conversation_info(conv, tok, TPI, ctx_len=ctx)
        assert len(e.input_ids) <= ctx and len(e.labels) == len(e.input_ids)
        assert e.input_ids.count(IMAGE_TOKEN_ID) == e.n_images_kept * TPI
        assert e.input_ids == full.input_ids[: len(e.input_ids)]
    # a cut in the answer keeps everything before it
    enc = encode_conversation_info(conv, tok, TPI, ctx_len=len(full.input_ids) - 3)
    assert enc.input_ids == full.input_ids[:-3] and enc.n_images_kept == 2


def test_generation_prompt(tok, trie):
    ids = encode_generation_prompt("What color is it?", tok, TPI)
    assert ids == trie.encode("User: ") + IMG + trie.encode("\nWhat color is it?\n\n") + [5585, 41693, 59]
    # markers in the question are replaced by n_images markers at the front
    assert encode_generation_prompt("What color is it?\n<image>", tok, TPI) == ids
    two = encode_generation_prompt("Compare.", tok, TPI, n_images=2)
    assert two == trie.encode("User: ") + IMG + trie.encode("\n") + IMG + trie.encode("\nCompare.\n\nAssistant:")
    assert encode_generation_prompt("Hi", tok, TPI, n_images=0) == trie.encode("User: Hi\n\nAssistant:")


def test_generation_prompt_is_a_prefix_of_training_ids(tok):
    conv = [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]
    ids, _ = encode_conversation(conv, tok, TPI)
    prompt = encode_generation_prompt("What color is it?", tok, TPI)
    assert ids[: len(prompt)] == prompt


def test_bad_turns_raise(tok):
    with pytest.raises(DataError, match="gpt turn"):
        encode_conversation([{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image> y"}], tok, TPI)
    with pytest.raises(DataError, match="unknown speaker"):
        encode_conversation([{"from": "system", "value": "x"}], tok, TPI)


def test_normalize_is_idempotent():
    for role, text in [("human", "a\n\n\nb <image>\n"), ("gpt", " x\n \n y "), ("human", "<image>")]:
        once = normalize_turn_text(role, text)
        assert normalize_turn_text(role, once) == once
    assert normalize_turn_text("human", "a\n\n\nb <image>\n") == "<image>\na\nb"


def test_middle_image_position_two_turns(tok, trie):
    """v6.0's finetune placement: `User: {every question, the image turn's without the
    short-answer line}\\n<image>\\n{q}` (issue 23), each side tokenised separately; the
    follow-up turn and the answers are unchanged."""
    short = "Answer the question using a single word or phrase."
    conv = [
        {"from": "human", "value": f"<image>\nWhat is on the table?\n{short}"},
        {"from": "gpt", "value": "Apples"},
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "Three."},
    ]
    h1 = trie.encode("User: What is on the table?\nHow many?\n") + IMG + trie.encode(f"\nWhat is on the table?\n{short}\n\n")
    g1, g1l = gpt_turn(trie, "Apples")
    h2 = trie.encode("User: How many?\n\n")
    g2, g2l = gpt_turn(trie, "Three.")
    ids, labels = encode_conversation(conv, tok, TPI, image_position="middle")
    assert ids == h1 + g1 + h2 + g2
    assert labels == [M] * len(h1) + g1l + [M] * len(h2) + g2l
    start = ids.index(IMAGE_TOKEN_ID)
    assert start == len(trie.encode("User: What is on the table?\nHow many?\n"))
    assert labels[start : start + TPI] == [M] * TPI
    # the default stays `first`; a prepare-data record (marker in front) gives the same middle ids
    assert encode_conversation(conv, tok, TPI)[0][: len(trie.encode("User: ")) + TPI] == trie.encode("User: ") + IMG
    conv[0]["value"] = normalize_turn_text("human", conv[0]["value"])
    assert encode_conversation(conv, tok, TPI, image_position="middle") == (ids, labels)
    with pytest.raises(ValueError, match="image_position"):
        encode_conversation(conv, tok, TPI, image_position="end")
