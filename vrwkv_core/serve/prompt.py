"""OpenAI `messages` -> the model's token ids, with the chat template `ChatSession` uses.

- user turns: `User: <image rows>\\n{text}\\n\\n` (`encode_turn`, so images go to the front of
  their turn, or to the middle for `image_position: middle` models); text parts join with
  a newline; each image takes one placeholder run per processor view;
- assistant turns: `Assistant: {text}\\n\\n`; an answer this server gave is encoded to the
  ids it generated (`AnswerMemo`), so the cached state matches the ids exactly;
- system/developer turns: `System: {text}\\n\\n` (the template has no system role; this
  is the RWKV World convention);
- the last message must be a user turn; `Assistant:` follows it;
- the first prefill (up to the first `Assistant:`) is left-padded as `chat` pads it
  (`Family.prefill_pad`: v7.00 with token 261 to a multiple of 16).

`boundaries` are the prefix lengths a cached state may exist for: each turn end, and the
position after the last image of a user turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from vrwkv_core.data.conversation import ROLE_PREFIX, collapse_blank_lines, encode_turn, left_pad
from vrwkv_core.infer import image_key
from vrwkv_core.infer.sampling import IMAGE_TOKEN_ID
from vrwkv_core.serve.engine import AnswerMemo, PromptImage
from vrwkv_core.serve.errors import ApiError
from vrwkv_core.serve.schemas import ImagePart, Message, TextPart

if TYPE_CHECKING:
    from PIL import Image

    from vrwkv_core.tokenizer import RWKVTokenizer


@dataclass
class Prompt:
    ids: list[int]
    images: list[PromptImage] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)


def build_prompt(
    messages: list[Message],
    tokenizer: RWKVTokenizer,
    model: object,
    load_image: Callable[[str], Image.Image],
    memo: AnswerMemo | None = None,
    prefill_pad: bool = True,
) -> Prompt:
    """Encodes a conversation (see the module docstring); ApiError 400 for one the template cannot take."""
    if messages[-1].role != "user":
        raise ApiError(400, "the last message must come from the user", "invalid_messages", "messages")
    assistant = list(tokenizer.encode(ROLE_PREFIX["gpt"] + ":"))
    P = getattr(model, "tokens_per_image", 0)
    position = getattr(getattr(model, "config", None), "image_position", "first")
    proc = getattr(model, "image_processor", None)
    out = Prompt([])
    first_end = None  # where the first prefill of the conversation ends
    for i, msg in enumerate(messages):
        text, urls = _parts(msg, i)
        if msg.role == "user":
            views = []
            for url in urls:
                if proc is None:
                    raise ApiError(400, "this model takes no images", "invalid_image_url", f"messages.{i}.content")
                image = load_image(url)
                im = PromptImage(image_key(image), list(proc.views(image)))
                out.images.append(im)
                views.extend(im.views)
            if not text.strip() and not views:
                raise ApiError(400, f"messages.{i}: empty user message", "invalid_messages", f"messages.{i}.content")
            value = "\n".join(["<image>"] * len(views) + [text])
            turn = encode_turn("human", value, tokenizer, P, position)
            out.ids += turn
            if views:
                last = max(j for j, t in enumerate(out.ids) if t == IMAGE_TOKEN_ID)
                out.boundaries.append(last + 1)
            if i + 1 < len(messages) and messages[i + 1].role == "assistant" or i + 1 == len(messages):
                out.ids += assistant
                first_end = len(out.ids) if first_end is None else first_end
        elif msg.role == "assistant":
            if urls:
                raise ApiError(400, f"messages.{i}: an assistant message cannot hold images", "invalid_messages",
                               f"messages.{i}.content")  # fmt: skip
            if out.ids[-len(assistant) :] != assistant:
                out.ids += assistant
            answer = memo.get(text) if memo is not None else None
            out.ids += answer if answer is not None else encode_turn("gpt", text, tokenizer, P)[len(assistant) :]
        else:  # system / developer
            if urls:
                raise ApiError(400, f"messages.{i}: a {msg.role} message cannot hold images", "invalid_messages",
                               f"messages.{i}.content")  # fmt: skip
            out.ids += list(tokenizer.encode(f"System: {collapse_blank_lines(text)}\n\n"))
        out.boundaries.append(len(out.ids))
    family = getattr(model, "family", None)
    pad = left_pad(first_end or len(out.ids), family.prefill_pad if (family is not None and prefill_pad) else 0)
    if pad:
        out.ids = pad + out.ids
        out.boundaries = [b + len(pad) for b in out.boundaries]
    return out


def _parts(msg: Message, index: int) -> tuple[str, list[str]]:
    """(text parts joined by newlines, image URLs in order) of one message."""
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or "", []
    texts = [p.text for p in msg.content if isinstance(p, TextPart)]
    urls = [p.image_url.url for p in msg.content if isinstance(p, ImagePart)]
    return "\n".join(texts), urls


__all__ = ["Prompt", "build_prompt"]
