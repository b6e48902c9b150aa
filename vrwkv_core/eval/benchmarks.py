"""The benchmark registry: name -> how to load its ground truth, read an answer, score.

Each `Benchmark` bundles an annotation loader (`load`), the post-processing applied to a
model answer before it is compared (`postprocess`), the metric over a whole answer file
(`metric`), and, for answer generation, the instruction appended to each question
(`prompt_suffix`). File formats and the --annotations/--questions table: DESIGN.md,
"Evaluation files".

    from vrwkv_core.eval import get_benchmark
    result = get_benchmark("textvqa").score("answers.jsonl", "TextVQA_0.5.1_val.json")
    result.to_json()   # {"benchmark": "textvqa", "accuracy": 0.61, "count": ..., ...}

Scoring policy shared by all benchmarks: an answer line whose id is not in the ground
truth is an error; repeated ids count once (the first line wins) and are reported;
questions without an answer are reported as `missing` and left out of the accuracy,
except in ScienceQA, whose official script counts them as failed. VQAv2 test-dev has no
ground truth: scoring writes the EvalAI submission file instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vrwkv_core.data.conversation import SHORT_ANSWER
from vrwkv_core.errors import DataError, VrwkvError
from vrwkv_core.eval import metrics
from vrwkv_core.eval.answers import Answer, dedupe, read_answers
from vrwkv_core.eval.normalize import normalize_answer
from vrwkv_core.fsutil import atomic_write_text
from vrwkv_core.textio import iter_lines, read_text

OPTION_LETTER = "Answer with the option's letter from the given choices directly."
VQAV2_SERVER = "https://eval.ai/web/challenges/challenge-page/830/submission"  # LLaVA's docs/Evaluation.md

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "ScoreResult",
    "get_benchmark",
    "textvqa_question_from_prompt",
]


@dataclass
class ScoreResult:
    """What `vrwkv eval score` prints."""

    benchmark: str
    accuracy: float | None
    """Overall accuracy in [0, 1]; None when there is nothing to compare (VQAv2 test-dev)."""
    count: int
    """Questions scored."""
    missing: int = 0
    """Questions of the ground truth with no answer."""
    duplicates: int = 0
    """Answer lines dropped because their question was answered earlier in the file."""
    details: dict[str, Any] = field(default_factory=dict)
    """Benchmark-specific numbers: `img_accuracy` (ScienceQA), one dict per POPE or shapes
    category, `submission` (VQAv2 test-dev)."""

    def to_json(self) -> dict[str, Any]:
        """The `--json` object."""
        return {"benchmark": self.benchmark, "accuracy": self.accuracy, "count": self.count,
                "missing": self.missing, "duplicates": self.duplicates, **self.details}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: ground truth loader, answer post-processing, metric, prompt suffix."""

    name: str
    summary: str
    annotations_help: str
    """What --annotations points at."""
    load: Callable[[Path, Path | None], Any]
    """(annotations, questions) -> ground truth; raises DataError on missing/bad files."""
    postprocess: Callable[[str], str]
    """Model answer -> the string that is compared (or submitted)."""
    metric: Callable[[list[Answer], Any, Path | None], ScoreResult]
    """(answers, ground truth, submission path) -> result."""
    questions_help: str | None = None
    """What --questions points at; None when the benchmark does not use it."""
    requires_questions: bool = False
    prompt_suffix: str | None = None
    """Instruction appended (on its own line) to each question by answer generation, as in
    LLaVA-1.5's eval question files; None: questions are used as written."""
    llava_suffix: str | None = None
    """The instruction of prompt style `llava` where the VisualRWKV originals used none
    (ScienceQA: LLaVA's letter instruction); None: `prompt_suffix` in every style."""
    skip_text_only: bool = False
    """The v7.00 eval answers image questions only (ScienceQA: text-only ones then count as
    failed in `accuracy` and are left out of `img_accuracy`); styles `v6` and `llava` answer them all."""
    writes_submission: bool = False
    """True when scoring writes a submission file (--submission) instead of comparing."""
    submission_suffix: str = ".evalai.json"
    """The default submission file: `<answers stem><suffix>` beside the answers."""

    def score(
        self,
        answers: str | Path,
        annotations: str | Path,
        questions: str | Path | None = None,
        submission: str | Path | None = None,
    ) -> ScoreResult:
        """Score an answer file. `submission` (VQAv2 test-dev, VizWiz test, MM-Vet) defaults
        to `<answers stem><submission_suffix>` beside the answers."""
        answers = Path(answers)
        if self.requires_questions and questions is None:
            raise DataError(f"{self.name}: --questions is required ({self.questions_help})")
        truth = self.load(Path(annotations), Path(questions) if questions else None)
        records = read_answers(answers)
        if not records:
            raise DataError(f"no answers in {answers}")
        out = None
        if self.writes_submission:
            out = Path(submission) if submission else answers.with_name(answers.stem + self.submission_suffix)
        return self.metric(records, truth, out)


# ---------------------------------------------------------------- file helpers

def read_json(path: Path, what: str) -> Any:
    """A JSON file's data; DataError "WHAT not found" or naming the bad line."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        return json.loads(read_text(path, what=what))
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file; DataError naming a bad line."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    rows = []
    for lineno, raw in iter_lines(path, what=what):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        rows.append((lineno, obj))
    return rows


def _require(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
    for key in keys:
        if key not in obj:
            raise DataError(f"{where}: missing '{key}'")


def _list_field(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a '{key}' list")
    return data[key]


def _check_known(answers: list[Answer], known: Callable[[Answer], bool], truth_file: Path) -> None:
    unknown = [a for a in answers if not known(a)]
    if unknown:
        more = f" (and {len(unknown) - 1} more unknown ids)" if len(unknown) > 1 else ""
        raise DataError(
            f"{unknown[0].where}: question_id {unknown[0].question_id!r} is not in {truth_file}{more}",
            hint="check that the answers and the annotation file belong to the same benchmark/split",
        )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- TextVQA

@dataclass
class _TextVQATruth:
    path: Path
    by_qid: dict[str, dict]
    by_image_question: dict[tuple[str, str], dict]
    image_ids: set[str]


def _load_textvqa(annotations: Path, questions: Path | None) -> _TextVQATruth:
    entries = _list_field(read_json(annotations, "TextVQA annotations"), "data", annotations)
    by_qid, by_iq = {}, {}
    for i, e in enumerate(entries):
        _require(e, ("question_id", "image_id", "question", "answers"), f"{annotations}: data[{i}]")
        if not isinstance(e["answers"], list) or not e["answers"]:
            raise DataError(f"{annotations}: data[{i}]: 'answers' must be a non-empty list")
        by_qid[str(e["question_id"])] = e
        by_iq[(str(e["image_id"]), str(e["question"]).lower())] = e
    return _TextVQATruth(annotations, by_qid, by_iq, {k[0] for k in by_iq})


def textvqa_question_from_prompt(prompt: str) -> str | None:
    """The question inside a LLaVA TextVQA prompt, lower-cased (LLaVA's eval_textvqa rule):
    OCR-token prompts, "question\\nReference OCR token: ...\\nsuffix", "question\\nsuffix";
    a one-line prompt is the question itself. None when the layout is not recognised."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) in (1, 2):
        question = lines[0]
    else:
        question = None
    return question.lower() if question is not None else None


def _textvqa_resolve(a: Answer, truth: _TextVQATruth) -> dict | None:
    # Official annotation ids first; LLaVA's question file puts the image id in question_id.
    if a.key in truth.by_qid:
        return truth.by_qid[a.key]
    if a.key in truth.image_ids:
        question = textvqa_question_from_prompt(a.prompt.replace("<image>\n", "").strip())
        if question is None:
            raise DataError(f"{a.where}: cannot find the question in the prompt {a.prompt[:60]!r}")
        entry = truth.by_image_question.get((a.key, question))
        if entry is None:
            raise DataError(f"{a.where}: no question {question!r} for image {a.key} in {truth.path}")
        return entry
    return None


def _metric_textvqa(answers: list[Answer], truth: _TextVQATruth, _out: Path | None) -> ScoreResult:
    resolved = {id(a): _textvqa_resolve(a, truth) for a in answers}
    _check_known(answers, lambda a: resolved[id(a)] is not None, truth.path)
    kept, dup = dedupe(answers, key=lambda a: str(resolved[id(a)]["question_id"]))
    scores = [metrics.textvqa_accuracy(a.text, resolved[id(a)]["answers"]) for a in kept]
    return ScoreResult("textvqa", _mean(scores), len(kept), len(truth.by_qid) - len(kept), dup)


# ---------------------------------------------------------------- VQAv2 val and test-dev

@dataclass
class _VQAv2Truth:
    path: Path
    humans: dict[str, list[str]]
    """question id -> the human answers of the questions in scope."""


def _load_vqav2(annotations: Path, questions: Path | None) -> _VQAv2Truth:
    entries = _list_field(read_json(annotations, "VQAv2 annotations"), "annotations", annotations)
    humans: dict[str, list[str]] = {}
    for i, e in enumerate(entries):
        where = f"{annotations}: annotations[{i}]"
        _require(e, ("question_id", "answers"), where)
        if not isinstance(e["answers"], list) or not e["answers"]:
            raise DataError(f"{where}: 'answers' must be a non-empty list")
        for a in e["answers"]:
            _require(a, ("answer",), f"{where}.answers")
        humans[str(e["question_id"])] = [str(a["answer"]) for a in e["answers"]]
    if questions is not None:
        # The question file fixes the scope (e.g. a subset); every question needs annotations.
        qs = _list_field(read_json(questions, "VQAv2 questions"), "questions", questions)
        scope = {}
        for i, q in enumerate(qs):
            _require(q, ("question_id",), f"{questions}: questions[{i}]")
            qid = str(q["question_id"])
            if qid not in humans:
                raise DataError(f"{questions}: question_id {q['question_id']} has no annotation in {annotations}")
            scope[qid] = humans[qid]
        humans = scope
    return _VQAv2Truth(annotations, humans)


def _metric_vqav2(answers: list[Answer], truth: _VQAv2Truth, _out: Path | None) -> ScoreResult:
    _check_known(answers, lambda a: a.key in truth.humans, truth.path)
    kept, dup = dedupe(answers)
    scores = [metrics.vqav2_accuracy(a.text, truth.humans[a.key]) for a in kept]
    return ScoreResult("vqav2", _mean(scores), len(kept), len(truth.humans) - len(kept), dup)


@dataclass
class _TestQuestions:
    path: Path
    ids: list[int | str]
    """Question ids in file order, with their original JSON type."""


def _load_vqav2_test(annotations: Path, questions: Path | None) -> _TestQuestions:
    if annotations.suffix == ".jsonl":
        rows = [(f"{annotations}:{n}", obj) for n, obj in read_jsonl(annotations, "VQAv2 test questions")]
    else:
        data = read_json(annotations, "VQAv2 test questions")
        qs = _list_field(data, "questions", annotations)
        rows = [(f"{annotations}: questions[{i}]", q) for i, q in enumerate(qs)]
    ids = []
    for where, q in rows:
        _require(q, ("question_id",), where)
        ids.append(q["question_id"])
    return _TestQuestions(annotations, ids)


def _metric_vqav2_test(answers: list[Answer], truth: _TestQuestions, out: Path | None) -> ScoreResult:
    """LLaVA's scripts/convert_vqav2_for_submission.py: one {"question_id", "answer"} per id of the
    test file, in its order, the answer through the EvalAI answer processor, "" when unanswered."""
    known = {str(q) for q in truth.ids}
    _check_known(answers, lambda a: a.key in known, truth.path)
    kept, dup = dedupe(answers)
    by_id = {a.key: normalize_answer(a.text) for a in kept}
    # EvalAI wants every test2015 id, also for the test-dev phase; LLaVA submits "" for the ones without an answer.
    rows = [{"question_id": q, "answer": by_id.get(str(q), "")} for q in truth.ids]
    assert out is not None
    atomic_write_text(out, json.dumps(rows))
    missing = len(truth.ids) - len(kept)
    note = (f"VQAv2 test-dev answers are not public, so there is no score here: upload {out} "
            f"({len(kept)} answered, {missing} of the {len(rows)} test2015 ids as \"\") to {VQAV2_SERVER}")
    return ScoreResult("vqav2-testdev", None, len(kept), missing, dup,
                       {"submission": str(out), "written": len(rows), "note": note})


# ---------------------------------------------------------------- GQA

@dataclass
class _GQATruth:
    path: Path
    answers: dict[str, str]
    """Balanced questions only (GQA's eval.py scores only those)."""
    all_ids: set[str]


def _load_gqa(annotations: Path, questions: Path | None) -> _GQATruth:
    data = read_json(annotations, "GQA questions")
    if not isinstance(data, dict):
        raise DataError(f"{annotations}: expected a JSON object {{question id: question}}")
    gold = {}
    for qid, q in data.items():
        _require(q, ("answer",), f"{annotations}: [{qid!r}]")
        if q.get("isBalanced", True):
            gold[str(qid)] = str(q["answer"])
    return _GQATruth(annotations, gold, {str(k) for k in data})


def _metric_gqa(answers: list[Answer], truth: _GQATruth, _out: Path | None) -> ScoreResult:
    _check_known(answers, lambda a: a.key in truth.all_ids, truth.path)
    kept, dup = dedupe(a for a in answers if a.key in truth.answers)
    scores = [float(metrics.gqa_prediction(a.text) == truth.answers[a.key]) for a in kept]
    return ScoreResult("gqa", _mean(scores), len(kept), len(truth.answers) - len(kept), dup)


# ---------------------------------------------------------------- ScienceQA

@dataclass
class _SQATruth:
    path: Path
    problems: dict[str, dict]
    """The test split, in pid_splits.json order."""


def _load_scienceqa(annotations: Path, questions: Path | None) -> _SQATruth:
    folder = annotations.parent if annotations.is_file() else annotations
    problems = read_json(folder / "problems.json", "ScienceQA problems.json")
    splits = read_json(folder / "pid_splits.json", "ScienceQA pid_splits.json")
    if not isinstance(splits, dict) or not isinstance(splits.get("test"), list):
        raise DataError(f"{folder / 'pid_splits.json'}: no 'test' list")
    if not isinstance(problems, dict):
        raise DataError(f"{folder / 'problems.json'}: expected a JSON object {{pid: problem}}")
    test = {}
    for pid in splits["test"]:
        prob = problems.get(str(pid))
        if prob is None:
            raise DataError(f"{folder / 'pid_splits.json'}: test pid {pid!r} is not in problems.json")
        _require(prob, ("choices", "answer"), f"{folder / 'problems.json'}: [{pid!r}]")
        test[str(pid)] = prob
    return _SQATruth(folder / "pid_splits.json", test)


def _metric_scienceqa(answers: list[Answer], truth: _SQATruth, _out: Path | None) -> ScoreResult:
    _check_known(answers, lambda a: a.key in truth.problems, truth.path)
    kept, dup = dedupe(answers)
    by_id = {a.key: a for a in kept}
    correct = img_correct = img_total = 0
    for pid, prob in truth.problems.items():
        a = by_id.get(pid)
        ok = metrics.scienceqa_correct(a.text if a else None, len(prob["choices"]), prob["answer"])
        correct += ok
        # As the official script: "with an image" means the prompt carried "<image>";
        # a missing answer has no prompt and is left out of img_accuracy.
        if a is not None and "<image>" in a.prompt:
            img_total += 1
            img_correct += ok
    total = len(truth.problems)
    return ScoreResult(
        "scienceqa", correct / total if total else None, total, total - len(kept), dup,
        {"img_accuracy": img_correct / img_total if img_total else None, "img_count": img_total},
    )


# ---------------------------------------------------------------- POPE

@dataclass
class _PopeTruth:
    path: Path
    labels: dict[str, list[tuple[int, dict]]]
    """category -> (line, record) of coco_pope_<category>.json, in file order."""
    questions: dict[str, tuple[str, int, int, dict]]
    """question id -> (category, index within its category, line, record)."""
    questions_path: Path


def _load_pope(annotations: Path, questions: Path | None) -> _PopeTruth:
    assert questions is not None
    if not annotations.exists():
        raise DataError(f"POPE annotations not found: {annotations}")
    files = [annotations] if annotations.is_file() else sorted(annotations.glob("coco_pope_*.json"))
    if not files:
        raise DataError(f"{annotations}: no coco_pope_<category>.json files")
    labels = {}
    for f in files:
        if not (f.name.startswith("coco_pope_") and f.name.endswith(".json")):
            raise DataError(f"{f}: POPE label files are named coco_pope_<category>.json")
        rows = read_jsonl(f, "POPE labels")
        for n, row in rows:
            _require(row, ("label",), f"{f}:{n}")
        labels[f.name[len("coco_pope_"):-len(".json")]] = rows
    by_id: dict[str, tuple[str, int, int, dict]] = {}
    seen: dict[str, int] = {}
    for n, q in read_jsonl(questions, "POPE questions"):
        _require(q, ("question_id", "category"), f"{questions}:{n}")
        cat = str(q["category"])
        k = seen.get(cat, 0)
        seen[cat] = k + 1
        by_id[str(q["question_id"])] = (cat, k, n, q)
    return _PopeTruth(annotations, labels, by_id, questions)


def _pope_label(truth: _PopeTruth, a: Answer) -> str:
    # The official script pairs the k-th question of a category with the k-th label line;
    # here each answer is paired through its question, and the pairing is checked.
    cat, k, n, q = truth.questions[a.key]
    where = f"{truth.questions_path}:{n}"
    label_file = f"coco_pope_{cat}.json"
    if cat not in truth.labels:
        raise DataError(f"{where}: category {cat!r} has no {label_file} in {truth.path}")
    rows = truth.labels[cat]
    if k >= len(rows):
        raise DataError(f"{where}: category {cat!r} has more questions than {label_file} has lines")
    ln, row = rows[k]
    same_image = "image" not in q or "image" not in row or q["image"] == row["image"]
    same_text = ("text" not in q or "text" not in row
                 or q["text"].split("\n")[0].strip() == row["text"].strip())
    if not (same_image and same_text):
        raise DataError(
            f"{where}: question does not match line {ln} of {label_file}",
            hint="the question file and the label files must list each category in the same order",
        )
    return str(row["label"])


def _metric_pope(answers: list[Answer], truth: _PopeTruth, _out: Path | None) -> ScoreResult:
    _check_known(answers, lambda a: a.key in truth.questions, truth.questions_path)
    kept, dup = dedupe(answers)
    kept.sort(key=lambda a: truth.questions[a.key][2])
    per_cat: dict[str, tuple[list[str], list[str]]] = {}
    for a in kept:
        preds, labels = per_cat.setdefault(truth.questions[a.key][0], ([], []))
        labels.append(_pope_label(truth, a))
        preds.append(metrics.pope_yes_no(a.text))
    details: dict[str, Any] = {}
    n_right = 0
    for cat in sorted(per_cat):
        preds, labels = per_cat[cat]
        details[cat] = {**metrics.pope_metrics(preds, labels), "count": len(preds)}
        n_right += sum((p == "no") == (lab == "no") for p, lab in zip(preds, labels))
    scoreable = sum(1 for c, *_ in truth.questions.values() if c in truth.labels)
    return ScoreResult("pope", n_right / len(kept), len(kept), scoreable - len(kept), dup, details)


# ---------------------------------------------------------------- shapes

@dataclass
class _ShapesTruth:
    path: Path
    accepted: dict[str, list[str]]
    categories: dict[str, str]
    """question id -> category, from the questions.jsonl beside answers.json (empty if none)."""


def _load_shapes(annotations: Path, questions: Path | None) -> _ShapesTruth:
    path = annotations
    if annotations.is_dir():
        path = next((p for p in (annotations / "answers.json", annotations / "eval" / "answers.json")
                     if p.is_file()), annotations / "eval" / "answers.json")
    data = read_json(path, "shapes answers")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{question id: [accepted answers]}}")
    accepted = {}
    for qid, value in data.items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise DataError(f"{path}: [{qid!r}] must be a non-empty list of strings")
        accepted[str(qid)] = values
    questions = questions or path.parent / "questions.jsonl"
    categories = {}
    if questions.is_file():
        categories = {str(q["question_id"]): str(q["category"]) for _, q in read_jsonl(questions, "shapes questions")
                      if "question_id" in q and "category" in q}  # fmt: skip
    return _ShapesTruth(path, accepted, categories)


def _metric_shapes(answers: list[Answer], truth: _ShapesTruth, _out: Path | None) -> ScoreResult:
    _check_known(answers, lambda a: a.key in truth.accepted, truth.path)
    kept, dup = dedupe(answers)
    scores = [float(metrics.shapes_correct(a.text, truth.accepted[a.key])) for a in kept]
    by_cat: dict[str, list[float]] = {}
    for a, score in zip(kept, scores):
        if a.key in truth.categories:
            by_cat.setdefault(truth.categories[a.key], []).append(score)
    details = {"categories": {cat: {"accuracy": _mean(v), "count": len(v)} for cat, v in by_cat.items()}}
    return ScoreResult("shapes", _mean(scores), len(kept), len(truth.accepted) - len(kept), dup, details)


# ---------------------------------------------------------------- registry

def _scienceqa_postprocess(text: str) -> str:
    return metrics.scienceqa_letter(text)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "textvqa", "TextVQA val, VQA soft accuracy (LLaVA's m4c evaluator)",
            "TextVQA_0.5.1_val.json", _load_textvqa, normalize_answer, _metric_textvqa,
            prompt_suffix=SHORT_ANSWER,
        ),
        Benchmark(
            "vqav2", "VQAv2 val, VQA soft accuracy (vqaEval rules)",
            "v2_mscoco_val2014_annotations.json", _load_vqav2, normalize_answer, _metric_vqav2,
            questions_help="v2_OpenEnded_mscoco_val2014_questions.json (optional: limits the scope)",
            prompt_suffix=SHORT_ANSWER,
        ),
        Benchmark(
            "vqav2-testdev", "VQAv2 test-dev: writes the EvalAI submission JSON",
            "the test question file, every id of which is submitted (EvalAI wants all of "
            "test2015: v2_OpenEnded_mscoco_test2015_questions.json or llava_vqav2_mscoco_test2015.jsonl)",
            _load_vqav2_test, normalize_answer, _metric_vqav2_test,
            prompt_suffix=SHORT_ANSWER, writes_submission=True,
        ),
        Benchmark(
            "gqa", "GQA testdev-balanced, exact match", "testdev_balanced_questions.json",
            _load_gqa, metrics.gqa_prediction, _metric_gqa, prompt_suffix=SHORT_ANSWER,
        ),
        Benchmark(
            "scienceqa", "ScienceQA test split, letter accuracy and img_accuracy",
            "folder with problems.json and pid_splits.json", _load_scienceqa,
            _scienceqa_postprocess, _metric_scienceqa, llava_suffix=OPTION_LETTER, skip_text_only=True,
        ),
        Benchmark(
            "pope", "POPE (COCO): accuracy, precision, recall, F1, yes-ratio per category",
            "folder with coco_pope_{adversarial,popular,random}.json", _load_pope,
            metrics.pope_yes_no, _metric_pope,
            questions_help="llava_pope_test.jsonl (has 'category')", requires_questions=True,
            prompt_suffix=SHORT_ANSWER,
        ),
        Benchmark(
            "shapes", "synthetic shapes, exact match after normalisation",
            "DIR/eval/answers.json", _load_shapes, normalize_answer, _metric_shapes,
        ),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name` (case and '_'/'-' insensitive)."""
    key = name.strip().lower().replace("_", "-")
    if key not in BENCHMARKS:
        raise VrwkvError(f"unknown benchmark {name!r}", hint="known: " + ", ".join(BENCHMARKS))
    return BENCHMARKS[key]
