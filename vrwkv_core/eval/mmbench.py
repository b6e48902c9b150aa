"""MMBench and MMBench-CN: the TSV release, LLaVA's prompt, VLMEvalKit v0.2's circular exact-match scoring.

    vrwkv eval score mmbench --answers answers.jsonl --annotations mmbench_dev_20230712.tsv --json

The TSV (`index, question, hint, A..D, answer, category, l2-category, image, ...`, images as
base64) is both the question file and the ground truth. A row whose index is >= 1e6 is a
circular variant of question `index % 1e6` (options rotated, its own answer); LLaVA answers
every row once, with question_id = index.

Scoring (VLMEvalKit v0.2 `mcq_circular_eval` with the exact-matching policy, no GPT judge;
rules re-implemented from `matching_util.can_infer`): each answer is read as an option
letter; a question is right only if every row of its group gives that row's answer; a row
without an answer fails its group. Accuracy per question, per category and l2-category.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vrwkv_core.errors import DataError
from vrwkv_core.eval.answers import Answer, dedupe
from vrwkv_core.eval.benchmarks import OPTION_LETTER, Benchmark, ScoreResult, _check_known

OPTION_LETTER_CN = "请直接回答选项字母。"
CIRCULAR_OFFSET = 1_000_000
LLAVA_OPTIONS = ("A", "B", "C", "D")
"""The option columns LLaVA's model_vqa_mmbench puts in the prompt (up to the first empty one)."""

# pandas' default NA strings: VLMEvalKit and LLaVA read the TSV with pandas, so a cell holding
# one of these is "no value" for them (an empty hint, an option D that does not exist).
_NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})  # fmt: skip
# VLMEvalKit v0.2 `can_infer_option`: an answer containing one of these is read as "Z".
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
# ... and one containing this skips the letter rules (straight to matching option texts).
_API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = ".()[],:;!*#{}"

__all__ = ["BENCHMARKS", "OPTION_LETTER_CN", "MMBenchRow", "can_infer", "mmbench_prompt", "read_tsv"]


@dataclass(frozen=True)
class MMBenchRow:
    """One TSV row; cells that pandas would read as NA are None."""

    index: int
    cells: dict[str, str | None]
    line: int

    def get(self, column: str) -> str | None:
        return self.cells.get(column)

    @property
    def choices(self) -> dict[str, str]:
        """VLMEvalKit's `build_choices`: every option-letter column with a value."""
        return {c: v for c, v in self.cells.items() if len(c) == 1 and "A" <= c <= "Z" and v is not None}


def read_tsv(path: Path, what: str = "MMBench TSV") -> list[MMBenchRow]:
    """The rows of an MMBench TSV; DataError naming the file and line of a bad row."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KiB default
    rows: list[MMBenchRow] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or "index" not in header or "question" not in header:
            raise DataError(f"{path}:1: expected a header with 'index' and 'question' columns")
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} cells, the header has {len(header)}")
            cells = {k: (None if v in _NA_STRINGS else v) for k, v in zip(header, row)}
            try:
                index = int(cells["index"] or "")
            except ValueError:
                raise DataError(f"{path}:{line}: 'index' is not an integer ({cells['index']!r})") from None
            rows.append(MMBenchRow(index, cells, line))
    return rows


def mmbench_prompt(row: MMBenchRow) -> str:
    """LLaVA's model_vqa_mmbench question: hint (if any), question, then `A. text` lines
    for the options up to the first empty one (the letter instruction is added later)."""
    text = row.get("question") or ""
    if row.get("hint") is not None:
        text = f"{row.get('hint')}\n{text}"
    for letter in LLAVA_OPTIONS:
        option = row.get(letter)
        if option is None:
            break
        text += f"\n{letter}. {option}"
    return text


def can_infer(answer: str, choices: dict[str, str]) -> str | None:
    """The option letter VLMEvalKit v0.2 reads from an answer ("Z" for a refusal), or None."""
    return _infer_option(answer, choices) or _infer_text(answer, choices)


def _infer_option(answer: str, choices: dict[str, str]) -> str | None:
    if _API_FAILURE in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return "Z"
    for c in _SEPARATORS:
        answer = answer.replace(c, " ")
    tokens = answer.split()
    found = [c for c in choices if c in tokens]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in tokens:
        return "Z"
    return None


def _infer_text(answer: str, choices: dict[str, str]) -> str | None:
    answer = answer.lower()
    found = [c for c, text in choices.items() if text.lower() in answer]
    return found[0] if len(found) == 1 else None


@dataclass
class _MMBenchTruth:
    path: Path
    rows: dict[str, MMBenchRow]
    groups: dict[int, list[MMBenchRow]]
    """Main question index -> its rows (the main row first), as VLMEvalKit groups them."""


def _load(annotations: Path, questions: Path | None) -> _MMBenchTruth:
    rows = read_tsv(annotations)
    by_id: dict[str, MMBenchRow] = {}
    for row in rows:
        for column in ("answer", "category"):
            if row.get(column) is None:
                raise DataError(f"{annotations}:{row.line}: no '{column}' (scoring needs the dev split's answers)")
        by_id.setdefault(str(row.index), row)
    groups: dict[int, list[MMBenchRow]] = {r.index: [r] for r in by_id.values() if r.index < CIRCULAR_OFFSET}
    for row in by_id.values():
        if row.index >= CIRCULAR_OFFSET and row.index % CIRCULAR_OFFSET in groups:
            groups[row.index % CIRCULAR_OFFSET].append(row)
    return _MMBenchTruth(annotations, by_id, groups)


def _metric(name: str):
    def metric(answers: list[Answer], truth: _MMBenchTruth, _out: Path | None) -> ScoreResult:
        _check_known(answers, lambda a: a.key in truth.rows, truth.path)
        kept, dup = dedupe(answers)
        texts = {a.key: a.text for a in kept}
        hits: dict[int, bool] = {}
        for main, rows in truth.groups.items():
            hits[main] = all(str(r.index) in texts and can_infer(texts[str(r.index)], r.choices) == r.get("answer")
                             for r in rows)  # fmt: skip
        details: dict[str, Any] = {"groups": len(hits),
                                   "categories": _per_key(truth, hits, "category"),
                                   "l2_categories": _per_key(truth, hits, "l2-category")}  # fmt: skip
        accuracy = sum(hits.values()) / len(hits) if hits else None
        return ScoreResult(name, accuracy, len(kept), len(truth.rows) - len(kept), dup, details)

    return metric


def _per_key(truth: _MMBenchTruth, hits: dict[int, bool], column: str) -> dict[str, float]:
    """Accuracy per value of `column` of each question's main row (VLMEvalKit's report_acc)."""
    buckets: dict[str, list[bool]] = {}
    for main, hit in hits.items():
        value = truth.groups[main][0].get(column)
        if value is not None:
            buckets.setdefault(value, []).append(hit)
    return {k: sum(v) / len(v) for k, v in sorted(buckets.items())}


def _identity(text: str) -> str:
    return text


BENCHMARKS = (
    Benchmark(
        "mmbench", "MMBench dev (en): circular exact-match accuracy (VLMEvalKit v0.2)",
        "mmbench_dev_20230712.tsv", _load, _identity, _metric("mmbench"), prompt_suffix=OPTION_LETTER,
    ),
    Benchmark(
        "mmbench-cn", "MMBench-CN dev: circular exact-match accuracy (VLMEvalKit v0.2)",
        "mmbench_dev_cn_20231003.tsv", _load, _identity, _metric("mmbench-cn"), prompt_suffix=OPTION_LETTER_CN,
    ),
)  # fmt: skip
