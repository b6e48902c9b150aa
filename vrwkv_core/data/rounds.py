"""The original's multi-round passes for LLaVA records: `clean`, then `split` into chunks.

`clean` keeps the human/gpt pairs whose answer is not blank and drops a record left with
none. `split` cuts the pairs into chunks of at most `max_rounds`: each chunk is a copy of
the record (same id, same image); its first human turn gets `<image>\\n` in front when it
has no marker (records with an image only: the original also added one to text-only
records, which then fail the marker check) and, with `readd_instruction` (v7.00, not
v6.0), chunks after the first get `\\n` + the short-answer instruction appended when the
record's first human turn had it.

    chunks = split_rounds(record, max_rounds=5)   # [] when no pair survives cleaning
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from vrwkv_core.data.conversation import IMAGE_MARKER, SHORT_ANSWER


@dataclass
class RoundStats:
    """What the passes did, for stats.json."""

    max_rounds: int
    readd_instruction: bool
    source_records: int = 0
    records_out: int = 0
    pairs_dropped: int = 0
    """Human/gpt pairs dropped because the answer was blank (or the roles were not human, gpt)."""
    records_dropped: int = 0
    """Records left with no pair."""
    records_split: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"}


def _role(turn: Any) -> str:
    role = turn.get("from") if isinstance(turn, dict) else None
    return role.lower() if isinstance(role, str) else ""


def clean_pairs(conversations: list[Any]) -> tuple[list[list[dict]], int]:
    """(kept human/gpt pairs, number dropped): a pair survives when its answer is not blank."""
    pairs, dropped = [], 0
    for i in range(0, len(conversations) - 1, 2):
        human, gpt = conversations[i], conversations[i + 1]
        answer = gpt.get("value") if isinstance(gpt, dict) else None
        if _role(human) == "human" and _role(gpt) == "gpt" and isinstance(answer, str) and answer.strip():
            pairs.append([human, gpt])
        else:
            dropped += 1
    return pairs, dropped + len(conversations) % 2


def split_rounds(record: dict, max_rounds: int, readd_instruction: bool = True, stats: RoundStats | None = None) -> list[dict]:
    """The record's chunks after cleaning and splitting (see the module docstring)."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or max_rounds <= 0:
        return [record]  # not ours to judge: the record checker reports it
    pairs, dropped = clean_pairs(conversations)
    if stats is not None:
        stats.source_records += 1
        stats.pairs_dropped += dropped
    if not pairs:
        if stats is not None:
            stats.records_dropped += 1
        return []
    first_human = next((t.get("value", "") for t in conversations if _role(t) == "human"), "")
    has_sa = isinstance(first_human, str) and SHORT_ANSWER in first_human
    has_image = bool(record.get("image"))
    chunks = []
    for start in range(0, len(pairs), max_rounds):
        turns = copy.deepcopy([t for pair in pairs[start : start + max_rounds] for t in pair])
        head = turns[0]
        if start > 0 and readd_instruction and has_sa and not head["value"].rstrip().endswith(SHORT_ANSWER):
            head["value"] = head["value"] + "\n" + SHORT_ANSWER
        if has_image and IMAGE_MARKER not in head["value"]:
            head["value"] = IMAGE_MARKER + "\n" + head["value"]
        chunks.append({**record, "conversations": turns})
    if stats is not None:
        stats.records_out += len(chunks)
        stats.records_split += len(chunks) > 1
    return chunks
