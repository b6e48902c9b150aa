"""MME: yes/no questions in pairs per image, scored as MME's `eval_tool/calculation.py` does.

    vrwkv eval score mme --answers answers.jsonl --annotations MME_Benchmark_release_version --json

Ground truth: the release folder, one folder per subtask. artwork, celebrity, landmark,
posters and scene keep `images/X.jpg` + `questions_answers_YN/X.txt`; the others keep
`X.jpg|png` + `X.txt` side by side. Each .txt has two lines `question<TAB>Yes|No`.
LLaVA's `llava_mme.jsonl` uses the image path as question_id (shared by the image's two
questions), so an answer is matched through its prompt (LLaVA's convert_answer_to_mme.py).

Per subtask: acc (per question), acc_plus (images with both answers right), score =
acc*100 + acc_plus*100; perception and cognition sum the scores of their subtasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vrwkv_core.data.conversation import IMAGE_MARKER, SHORT_ANSWER
from vrwkv_core.errors import DataError
from vrwkv_core.eval.answers import Answer, dedupe
from vrwkv_core.eval.benchmarks import Benchmark, ScoreResult, _check_known

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
YES_NO = " Please answer yes or no."

__all__ = ["BENCHMARKS", "COGNITION", "PERCEPTION", "mme_yes_no"]


def mme_yes_no(text: str) -> str:
    """calculation.py's parse_pred_ans on the lower-cased answer: "yes"/"no" as they are,
    else "yes" or "no" within the first 4 characters ("yes" first), else "other"."""
    p = text.lower()
    if p in ("yes", "no"):
        return p
    if "yes" in p[:4]:
        return "yes"
    if "no" in p[:4]:
        return "no"
    return "other"


@dataclass
class _MMETruth:
    path: Path
    answers: dict[tuple[str, str, str], str]
    """(subtask, question file, question) -> "yes"/"no"."""


def _load(annotations: Path, questions: Path | None) -> _MMETruth:
    if not annotations.is_dir():
        raise DataError(f"MME release folder not found: {annotations}",
                        hint="--annotations is MME_Benchmark_release_version (one folder per subtask)")  # fmt: skip
    gt: dict[tuple[str, str, str], str] = {}
    for subtask in sorted(p for p in annotations.iterdir() if p.is_dir()):
        qa_dir = subtask / "questions_answers_YN" if (subtask / "images").is_dir() else subtask
        for txt in sorted(qa_dir.glob("*.txt")):
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2 or parts[1].lower() not in ("yes", "no"):
                    raise DataError(f"{txt}:{n}: expected 'question<TAB>Yes|No'")
                gt[(subtask.name, txt.name, parts[0])] = parts[1].lower()
    if not gt:
        raise DataError(f"{annotations}: no subtask folders with question .txt files")
    return _MMETruth(annotations, gt)


def _resolve(a: Answer, truth: _MMETruth) -> tuple[str, str, str] | None:
    """The answer's ground-truth key, as LLaVA's convert_answer_to_mme.py finds it."""
    qid = a.key
    subtask = qid.split("/")[0]
    file = qid.split("/")[-1].split(".")[0] + ".txt"
    question = a.prompt.replace(IMAGE_MARKER, "").replace(SHORT_ANSWER, "").strip()
    if "Please answer yes or no." not in question:
        question += YES_NO
        if (subtask, file, question) not in truth.answers:  # some release files have two spaces
            question = question.replace(YES_NO, " " + YES_NO)
    key = (subtask, file, question)
    return key if key in truth.answers else None


def _metric(answers: list[Answer], truth: _MMETruth, _out: Path | None) -> ScoreResult:
    keys = {id(a): _resolve(a, truth) for a in answers}
    _check_known(answers, lambda a: keys[id(a)] is not None, truth.path)
    kept, dup = dedupe(answers, key=lambda a: keys[id(a)])
    # subtask -> image (question file) -> [right?] of its answered questions
    per_image: dict[str, dict[str, list[bool]]] = {}
    for a in kept:
        subtask, file, _ = key = keys[id(a)]
        per_image.setdefault(subtask, {}).setdefault(file, []).append(mme_yes_no(a.text) == truth.answers[key])
    per_file = {}
    for subtask, file, _ in truth.answers:
        per_file[(subtask, file)] = per_file.get((subtask, file), 0) + 1
    subtasks: dict[str, dict[str, float]] = {}
    for subtask in sorted(per_image):
        images = per_image[subtask]
        right = [ok for oks in images.values() for ok in oks]
        acc = sum(right) / len(right)
        # an image counts as right only when every one of its questions was answered, and right
        acc_plus = sum(len(oks) == per_file[(subtask, f)] and all(oks) for f, oks in images.items()) / len(images)
        score = 0.0
        score += acc * 100  # summed term by term, in calculation.py's order, for the same last digit
        score += acc_plus * 100
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": score}
    details: dict[str, Any] = {}
    for name, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        total = 0
        for subtask in members:
            if subtask in subtasks:
                total += subtasks[subtask]["score"]
        details[name] = total
    details["total"] = details["perception"] + details["cognition"]
    details["subtasks"] = subtasks
    n_right = sum(ok for images in per_image.values() for oks in images.values() for ok in oks)
    return ScoreResult("mme", n_right / len(kept), len(kept), len(truth.answers) - len(kept), dup, details)


def _identity(text: str) -> str:
    return text


BENCHMARKS = (
    Benchmark(
        "mme", "MME: perception and cognition scores (acc + acc+ per subtask, MME's calculation.py)",
        "MME_Benchmark_release_version (one folder per subtask)", _load, _identity, _metric,
        prompt_suffix=SHORT_ANSWER,
    ),
)  # fmt: skip
