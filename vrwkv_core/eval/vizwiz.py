"""VizWiz-VQA: val accuracy with the VizWiz API's rules, or the EvalAI upload for test.

    vrwkv eval score vizwiz --answers answers.jsonl --annotations Annotations/val.json --questions llava_val.jsonl --json

Annotations: val.json / test.json, a list of {image, question, answers: 10 x {answer,
answer_confidence}, answer_type, answerable} (test.json has no answers). With --questions
(a LLaVA question file: question_id, image, text) an answer's question_id is looked up
there for its image; without it the question_id is the image name.

Val (rules re-implemented from LLaVA's convert_vizwiz_for_submission.py and the VizWiz API
scorer): the prediction goes through the EvalAI processor (`normalize_answer`, what LLaVA
uploads), then the scorer's own steps on the prediction only (newlines and tabs to spaces,
strip, punctuation, digits and articles); the human answers are compared as stored. Score:
the mean over the 10 annotators of min(1, matches among the other 9 / 3).
Test: writes the EvalAI upload [{image, answer}] (every test image; "" when unanswered).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vrwkv_core.data.conversation import SHORT_ANSWER
from vrwkv_core.errors import DataError
from vrwkv_core.eval import metrics
from vrwkv_core.eval.answers import Answer, dedupe
from vrwkv_core.eval.benchmarks import Benchmark, ScoreResult, _check_known, _mean, _require, read_json, read_jsonl
from vrwkv_core.eval.normalize import normalize_answer, process_digit_article, process_punctuation
from vrwkv_core.fsutil import atomic_write_text

ANSWER_TYPES = ("yes/no", "number", "other", "unanswerable")

__all__ = ["ANSWER_TYPES", "BENCHMARKS", "vizwiz_accuracy"]


def vizwiz_accuracy(text: str, humans: list[str]) -> float:
    """One answer's VizWiz accuracy against the (unprocessed) human answers."""
    pred = normalize_answer(text).replace("\n", " ").replace("\t", " ").strip()
    pred = process_digit_article(process_punctuation(pred))
    return metrics.soft_accuracy(pred, humans)


@dataclass
class _VizWizTruth:
    path: Path
    entries: dict[str, dict]
    """image name -> annotation entry."""
    scope: list[str]
    """Images in scope, in order (the question file's, else the annotations')."""
    images_of: dict[str, str] | None
    """question id -> image, from --questions; None: the question id is the image name."""
    labelled: bool
    """True for val (answers present), False for test (write the upload)."""


def _load(annotations: Path, questions: Path | None) -> _VizWizTruth:
    data = read_json(annotations, "VizWiz annotations")
    if not isinstance(data, list):
        raise DataError(f"{annotations}: expected a JSON list of {{image, question, answers, ...}}")
    entries = {}
    for i, e in enumerate(data):
        _require(e, ("image",), f"{annotations}: [{i}]")
        entries[str(e["image"])] = e
    labelled = bool(data) and all("answers" in e for e in data)
    if labelled:
        for i, e in enumerate(data):
            if not isinstance(e["answers"], list) or not e["answers"]:
                raise DataError(f"{annotations}: [{i}]: 'answers' must be a non-empty list")
            for a in e["answers"]:
                _require(a, ("answer",), f"{annotations}: [{i}].answers")
    images_of = None
    scope = list(entries)
    if questions is not None:
        images_of = {}
        for n, q in read_jsonl(questions, "VizWiz questions"):
            _require(q, ("question_id", "image"), f"{questions}:{n}")
            if str(q["image"]) not in entries:
                raise DataError(f"{questions}:{n}: image {q['image']!r} is not in {annotations}")
            images_of[str(q["question_id"])] = str(q["image"])
        scope = list(dict.fromkeys(images_of.values()))
    return _VizWizTruth(annotations, entries, scope, images_of, labelled)


def _metric(answers: list[Answer], truth: _VizWizTruth, out: Path | None) -> ScoreResult:
    def image(a: Answer) -> str | None:
        img = truth.images_of.get(a.key) if truth.images_of is not None else a.key
        return img if img in truth.entries else None

    _check_known(answers, lambda a: image(a) is not None, truth.path)
    kept, dup = dedupe(answers, key=image)
    missing = len(truth.scope) - len(kept)
    if not truth.labelled:
        by_image = {image(a): normalize_answer(a.text) for a in kept}
        rows = [{"image": img, "answer": by_image.get(img, "")} for img in truth.scope]
        assert out is not None
        atomic_write_text(out, json.dumps(rows))
        return ScoreResult("vizwiz", None, len(kept), missing, dup, {"submission": str(out), "written": len(rows)})
    per_type: dict[str, list[float]] = {t: [] for t in ANSWER_TYPES}
    scores = []
    for a in kept:
        e = truth.entries[image(a)]
        s = vizwiz_accuracy(a.text, [str(h["answer"]) for h in e["answers"]])
        scores.append(s)
        per_type.setdefault(str(e.get("answer_type")), []).append(s)
    return ScoreResult("vizwiz", _mean(scores), len(kept), missing, dup,
                       {"answer_types": {t: _mean(v) for t, v in per_type.items()}})  # fmt: skip


BENCHMARKS = (
    Benchmark(
        "vizwiz", "VizWiz-VQA: val accuracy (VizWiz API), or the EvalAI upload for test",
        "Annotations/val.json (scored) or Annotations/test.json (writes the upload to --submission)",
        _load, normalize_answer, _metric,
        questions_help="llava_val.jsonl / llava_test.jsonl (question_id -> image); without it question_id is the image name",
        prompt_suffix=SHORT_ANSWER, writes_submission=True,
    ),
)  # fmt: skip
