"""The VisualRWKV v7.00 chat template: turn text, token ids and training labels.

A conversation is LLaVA's list of `{"from": "human"|"gpt", "value": str}` turns. Each
turn becomes `User: {text}\\n\\n` or `Assistant: {text}\\n\\n` and is tokenized on its
own (the research code does the same, so ids match its training data exactly):

- `<image>` markers move to the front of their human turn, one per image, joined by
  `\\n`; each marker becomes `tokens_per_image` placeholder ids `IMAGE_TOKEN_ID`.
  With `image_position="middle"` (VisualRWKV v6.0's finetune and eval) a human turn with
  images becomes `{text without the short-answer line}\\n<image>\\n{text}` instead.
- Runs of blank lines inside a turn collapse to one `\\n` (`\\n\\n` is the stop token 261).
- Labels are -100 on human turns and on the 3 tokens of `Assistant:`; the answer and
  its closing `\\n\\n` are learned.
- Truncation to `ctx_len` (`whole_images`, ours) never cuts inside an image: an image that
  does not fit is dropped whole. The originals' rules are `head` (v7.00: the first ctx_len
  tokens, even through an image, whose remaining rows `image_rows` then says) and
  `tail_if_unlabelled` (v6.0: the last ctx_len tokens when the first hold no label; here
  moved forward to an image boundary, as the v6 patch-row reversal needs whole images).
  `EncodedConversation` says which images and tokens survived.
- `blank_image=True` (v6.0, `Family.blank_image_rows`): a conversation with no image starts
  with `tokens_per_image` blank placeholders `BLANK_IMAGE_TOKEN_ID` (label -100), the zero rows
  the original feeds before a text-only sample; they count towards ctx_len like an image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

from vrwkv_core.errors import DataError
from vrwkv_core.tokenizer import BLANK_IMAGE_TOKEN_ID, IMAGE_TOKEN_ID

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100
STOP_TOKEN_ID = 261  # "\n\n"
PAD_TOKEN_ID = 0
ROLE_PREFIX = {"human": "User", "gpt": "Assistant"}
TURN_END = "\n\n"
SHORT_ANSWER = "Answer the question using a single word or phrase."
IMAGE_POSITIONS = ("first", "middle", "last")
TRUNCATIONS = ("whole_images", "head", "tail_if_unlabelled")

_BLANK_LINES = re.compile(r"\n(\s*\n)+")


class Tokenizer(Protocol):
    """Anything with the World tokenizer's `encode`."""

    def encode(self, text: str) -> list[int]: ...


@dataclass
class EncodedConversation:
    """Ids and labels of one conversation, plus what truncation removed."""

    input_ids: list[int]
    labels: list[int]
    n_images: int
    """Images the conversation refers to."""
    n_images_kept: int
    """Images whose placeholder run survived truncation (always a prefix of the images)."""
    n_tokens_full: int
    """Length before truncation."""
    first_image: int = 0
    """Index of the first image kept (tail truncation drops leading images)."""
    image_rows: int | None = None
    """Placeholder rows kept of the last kept image when `head` truncation cut it, else None."""

    @property
    def truncated(self) -> bool:
        return len(self.input_ids) < self.n_tokens_full

    @property
    def n_labelled(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def collapse_blank_lines(text: str) -> str:
    """Strip, then turn every run of blank lines into a single newline."""
    return _BLANK_LINES.sub("\n", text.strip())


def normalize_turn_text(role: str, value: str, image_position: str = "first") -> str:
    """The turn's text as the template uses it: blank lines collapsed, markers to the front
    (`first`) or between the text without the short-answer line and the text (`middle`).

    Idempotent for `first`, so records written by `prepare-data` encode to the same ids;
    `middle` gives the same text from a raw turn and from its `first` form.
    """
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"image_position must be one of {IMAGE_POSITIONS}, got {image_position!r}")
    n_markers = value.count(IMAGE_MARKER)
    if n_markers == 0:
        return collapse_blank_lines(value)
    if role != "human":
        raise DataError(f"an {IMAGE_MARKER} marker in a {role} turn (only human turns may hold images)")
    text = collapse_blank_lines(value.replace(IMAGE_MARKER, ""))
    markers = "\n".join([IMAGE_MARKER] * n_markers)
    if image_position == "middle":
        before = collapse_blank_lines(text.replace(SHORT_ANSWER, ""))
        return "\n".join(part for part in (before, markers, text) if part)
    if image_position == "last":
        return "\n".join(part for part in (text, markers) if part)
    return (markers + "\n" + text).strip()


def normalize_role(role: Any) -> str:
    """'human'/'gpt' (any case) -> lower case; anything else is a DataError."""
    if isinstance(role, str) and role.lower() in ROLE_PREFIX:
        return role.lower()
    raise DataError(f"unknown speaker {role!r} (expected 'human' or 'gpt')")


def normalize_conversations(
    conversations: Iterable[Mapping[str, Any]], image_position: str = "first"
) -> list[dict[str, str]]:
    """LLaVA turns -> `[{"from": role, "value": normalised text}]`."""
    out = []
    for turn in conversations:
        role = normalize_role(turn.get("from"))
        value = turn.get("value")
        if not isinstance(value, str):
            raise DataError(f"a {role} turn whose value is not a string")
        out.append({"from": role, "value": normalize_turn_text(role, value, image_position)})
    if image_position == "middle":
        _middle_with_all_questions(conversations, out)
    return out


def _middle_with_all_questions(raw: Iterable[Mapping[str, Any]], out: list[dict[str, str]]) -> None:
    """v6.0's middle turn: `ALL\\n<image>\\n{own text}`, ALL = every human turn joined by `\\n`
    (the image turn without its markers and short-answer line, the others only stripped)."""
    humans = [t["value"] for t in raw if normalize_role(t.get("from")) == "human"]
    if len(humans) < 2:
        return  # one question: ALL is that question, what normalize_turn_text gives already
    parts = []
    for value in humans:
        if IMAGE_MARKER in value:
            value = value.replace(IMAGE_MARKER, "").replace(SHORT_ANSWER, "")
        parts.append(collapse_blank_lines(value))
    everything = "\n".join(p for p in parts if p)
    for turn, value in zip((t for t in out if t["from"] == "human"), humans):
        n = value.count(IMAGE_MARKER)
        if n:
            own = collapse_blank_lines(value.replace(IMAGE_MARKER, ""))
            turn["value"] = "\n".join(p for p in (everything, "\n".join([IMAGE_MARKER] * n), own) if p)


def encode_turn_text(text: str, tokenizer: Tokenizer, tokens_per_image: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize one already-templated turn string; returns ids and the [start, end) of each image run."""
    chunks = text.split(IMAGE_MARKER)
    ids = list(tokenizer.encode(chunks[0]))
    spans = []
    for chunk in chunks[1:]:
        spans.append((len(ids), len(ids) + tokens_per_image))
        ids.extend([IMAGE_TOKEN_ID] * tokens_per_image)
        if chunk:
            ids.extend(tokenizer.encode(chunk))
    return ids, spans


def encode_turn(
    role: str, value: str, tokenizer: Tokenizer, tokens_per_image: int, image_position: str = "first"
) -> list[int]:
    """Ids of one turn (`User: ...\\n\\n` or `Assistant: ...\\n\\n`), normalised first."""
    role = normalize_role(role)
    text = f"{ROLE_PREFIX[role]}: {normalize_turn_text(role, value, image_position)}{TURN_END}"
    return encode_turn_text(text, tokenizer, tokens_per_image)[0]


def _assistant_prefix_len(tokenizer: Tokenizer) -> int:
    return len(tokenizer.encode(ROLE_PREFIX["gpt"] + ":"))  # 3 with the World vocab: 5585 41693 59


def encode_conversation_info(
    conversations: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    tokens_per_image: int,
    ctx_len: int | None = None,
    image_position: str = "first",
    truncation: str = "whole_images",
    blank_image: bool = False,
) -> EncodedConversation:
    """Encode a LLaVA conversation; see the module docstring for the rules."""
    turns = normalize_conversations(conversations, image_position)
    n_mask_gpt = _assistant_prefix_len(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    if blank_image and not any(IMAGE_MARKER in t["value"] for t in turns if t["from"] == "human"):
        ids, labels = blank_image_ids(tokens_per_image), [IGNORE_INDEX] * tokens_per_image
    n_blank = len(ids)
    for turn in turns:
        role = turn["from"]
        text = f"{ROLE_PREFIX[role]}: {turn['value']}{TURN_END}"
        turn_ids, turn_spans = encode_turn_text(text, tokenizer, tokens_per_image)
        spans.extend((s + len(ids), e + len(ids)) for s, e in turn_spans)
        if role == "human":
            turn_labels = [IGNORE_INDEX] * len(turn_ids)
        else:
            turn_labels = [IGNORE_INDEX] * n_mask_gpt + turn_ids[n_mask_gpt:]
        ids.extend(turn_ids)
        labels.extend(turn_labels)

    n_full = len(ids)
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if ctx_len is None or n_full <= ctx_len:
        return EncodedConversation(ids, labels, len(spans), len(spans), n_full)
    whole = ([(0, n_blank)] if n_blank else []) + spans  # the blank rows are cut like an image
    if truncation == "tail_if_unlabelled" and all(x == IGNORE_INDEX for x in labels[:ctx_len]):
        begin = n_full - ctx_len
        for start, end in whole:
            if start < begin < end:  # whole images only (see the module docstring)
                begin = end
        first = sum(1 for _, end in spans if end <= begin)
        return EncodedConversation(ids[begin:], labels[begin:], len(spans), len(spans) - first, n_full, first_image=first)
    cut = ctx_len
    rows = None
    for start, end in whole:
        if start < cut < end:
            if truncation == "whole_images" or start < n_blank:  # never split an image's placeholder run
                cut = start
            else:
                rows = cut - start
            break
    kept = sum(1 for start, _ in spans if start < cut)
    return EncodedConversation(ids[:cut], labels[:cut], len(spans), kept, n_full, image_rows=rows)


def blank_image_ids(tokens_per_image: int) -> list[int]:
    """The blank image of a v6.0 text-only sample: `tokens_per_image` zero-row placeholders."""
    return [BLANK_IMAGE_TOKEN_ID] * tokens_per_image


def encode_conversation(
    conversations: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    tokens_per_image: int,
    ctx_len: int | None = None,
    image_position: str = "first",
    truncation: str = "whole_images",
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; `encode_conversation_info` also reports truncation."""
    enc = encode_conversation_info(conversations, tokenizer, tokens_per_image, ctx_len, image_position, truncation)
    return enc.input_ids, enc.labels


PAD_ID = 261
"""The token VisualRWKV v7.00 pads prompts with ("\\n\\n")."""


def left_pad(n_tokens: int, multiple: int) -> list[int]:
    """`(-n_tokens) mod multiple` PAD_IDs: what v7.00's forward prepends to an input of
    n_tokens embeddings so its length is a multiple of its CUDA kernel's chunk (16). Chat,
    eval and serve put it before the first prefill of a conversation (0 or 1: none)."""
    return [PAD_ID] * ((-n_tokens) % multiple) if multiple > 1 else []


def encode_generation_prompt(
    question_text: str,
    tokenizer: Tokenizer,
    tokens_per_image: int,
    n_images: int = 1,
    image_position: str = "first",
) -> list[int]:
    """Ids of `User: <image>...\\n{question}\\n\\nAssistant:` for generation.

    `<image>` markers already in `question_text` are removed; `n_images` markers are put
    at the front of the turn (0 gives a text-only prompt), or in the middle (see
    `normalize_turn_text`). Ends with the ids of `Assistant:` (no trailing space), so the
    model's next token starts the answer.
    """
    text = question_text.replace(IMAGE_MARKER, "")
    value = "\n".join([IMAGE_MARKER] * n_images + [text])
    ids = encode_turn("human", value, tokenizer, tokens_per_image, image_position)
    return ids + list(tokenizer.encode(ROLE_PREFIX["gpt"] + ":"))
