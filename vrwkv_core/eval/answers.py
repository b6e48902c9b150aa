"""LLaVA answer files: one JSON object a line with `question_id`, `prompt`, `text`, `model_id`.

`read_answers` validates every line and names the file and line of the first bad one;
each `Answer` remembers where it came from so later errors (an unknown id) can too.
`dedupe` keeps the first answer per key and counts the repeats (merged shards written
twice are the usual cause).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vrwkv_core.errors import DataError
from vrwkv_core.textio import iter_lines

__all__ = ["Answer", "dedupe", "read_answers", "write_answers"]


@dataclass(frozen=True)
class Answer:
    """One generated answer."""

    question_id: int | str
    """As in the question file (int for VQAv2/POPE, str for GQA/ScienceQA/LLaVA TextVQA)."""
    text: str
    """The model's answer."""
    prompt: str = ""
    """The question as given to the model (LLaVA keeps "<image>" in it for image questions)."""
    model_id: str = ""
    source: str = ""
    """File the answer was read from ("" when built in memory)."""
    line: int = 0
    """1-based line number in `source`."""

    @property
    def key(self) -> str:
        """The id as a string: annotation files mix int and str ids."""
        return str(self.question_id)

    @property
    def where(self) -> str:
        """"file:line" for error messages."""
        return f"{self.source}:{self.line}" if self.source else f"answer {self.question_id!r}"


def read_answers(path: str | Path) -> list[Answer]:
    """Read a JSONL answer file; blank lines are skipped. Raises DataError on the first
    malformed line, naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"answers file not found: {path}")
    return [parse_answer_line(raw, path, lineno) for lineno, raw in iter_lines(path, what="answers file")
            if raw.strip()]


def parse_answer_line(raw: str, path: Path, lineno: int) -> Answer:
    """One answer line -> Answer; DataError naming `path:lineno` when it is not one."""
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    qid = obj.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise DataError(f"{where}: 'question_id' missing or not an int/str")
    text = obj.get("text")
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' missing or not a string")
    prompt = obj.get("prompt", "")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' is not a string")
    model_id = obj.get("model_id") or ""
    return Answer(qid, text, prompt, str(model_id), str(path), lineno)


def write_answers(path: str | Path, answers: Iterable[Answer], append: bool = False) -> int:
    """Write (or append) answers as LLaVA JSONL; returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for a in answers:
            record = {"question_id": a.question_id, "prompt": a.prompt, "text": a.text,
                      "model_id": a.model_id}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def dedupe(
    answers: Iterable[Answer], key: Callable[[Answer], Hashable] = lambda a: a.key
) -> tuple[list[Answer], int]:
    """Keep the first answer per `key`; return (kept answers, number of repeats dropped)."""
    seen: set[Hashable] = set()
    kept: list[Answer] = []
    repeats = 0
    for a in answers:
        k = key(a)
        if k in seen:
            repeats += 1
        else:
            seen.add(k)
            kept.append(a)
    return kept, repeats
