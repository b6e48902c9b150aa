"""Chart and document VQA: ChartQA (relaxed accuracy), DocVQA and InfographicVQA (ANLS).

    vrwkv eval score chartqa --answers answers.jsonl --annotations "ChartQA Dataset/test" --json
    vrwkv eval score docvqa --answers answers.jsonl --annotations val/val_v1.0.json --json

Sources (rules re-implemented, not copied):
- ChartQA: pix2struct `metrics.py` `relaxed_correctness`: numbers within 5% of a non-zero
  target are right (exactly 5% included), anything else needs a case-insensitive equal string.
  Question ids: `human_<i>` / `augmented_<i>`, i the 0-based position in test_human.json /
  test_augmented.json.
- DocVQA / InfoVQA: the RRC ANLS script: per ground-truth answer, normalised Levenshtein
  distance (both strings stripped, lower-cased, runs of whitespace collapsed; divided by the
  longer raw string's length); score = 1 - the smallest, 0 when below 0.5.
- `exact_match` (all three): the original VisualRWKV's eval/visualrwkv_eval.py:
  text.strip().lower().strip('.') equal to an answer treated alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rapidfuzz.distance import Levenshtein

from vrwkv_core.data.conversation import SHORT_ANSWER
from vrwkv_core.errors import DataError
from vrwkv_core.eval.answers import Answer, dedupe
from vrwkv_core.eval.benchmarks import Benchmark, ScoreResult, _check_known, _list_field, _mean, _require, read_json

CHARTQA_SPLITS = ("human", "augmented")
RELAXED_TOLERANCE = 0.05
ANLS_THRESHOLD = 0.5

__all__ = [
    "BENCHMARKS",
    "anls",
    "chartqa_entries",
    "docvqa_entries",
    "exact_match",
    "relaxed_correct",
]


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str) -> bool:
    """pix2struct's relaxed correctness: within 5% of a non-zero numeric target, else equal
    ignoring case ("12%" reads as 0.12)."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:  # t is not None and t != 0 (NaN counts as non-zero, as there)
        return abs(p - t) / abs(t) <= RELAXED_TOLERANCE
    return prediction.lower() == target.lower()


def _em_form(text: str) -> str:
    return text.strip().lower().strip(".")


def exact_match(text: str, answers: Sequence[str]) -> bool:
    """The original VisualRWKV's exact match: strip, lower, strip periods, on both sides."""
    return _em_form(text) in {_em_form(g) for g in answers}


def _anls_form(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(text: str, answers: Sequence[str]) -> float:
    """ANLS of one answer: 1 - the smallest normalised Levenshtein distance to a ground-truth
    answer, 0 when that is below 0.5 (0.5 itself counts)."""
    distances = []
    for g in answers:
        length = max(len(g), len(text))
        distances.append(0.0 if length == 0 else Levenshtein.distance(_anls_form(g), _anls_form(text)) / length)
    score = 1 - min(distances)
    return 0.0 if score < ANLS_THRESHOLD else score


# ---------------------------------------------------------------- ChartQA

def chartqa_entries(folder: Path) -> list[tuple[str, str, dict]]:
    """(question id, split, entry) of test_human.json then test_augmented.json in `folder`
    (a file inside it works too); DataError when neither exists or an entry is malformed."""
    folder = folder if folder.is_dir() else folder.parent
    files = [(split, folder / f"test_{split}.json") for split in CHARTQA_SPLITS]
    if not any(f.is_file() for _, f in files):
        raise DataError(f"ChartQA test files not found: {files[0][1]} / {files[1][1]}",
                        hint="--annotations is the release's test folder ('ChartQA Dataset/test')")  # fmt: skip
    out = []
    for split, path in files:
        if not path.is_file():
            continue
        data = read_json(path, "ChartQA test file")
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of {{imgname, query, label}}")
        for i, e in enumerate(data):
            _require(e, ("imgname", "query", "label"), f"{path}: [{i}]")
            out.append((f"{split}_{i}", split, e))
    return out


@dataclass
class _ChartQATruth:
    path: Path
    labels: dict[str, tuple[str, str]]
    """question id -> (split, label)."""


def _load_chartqa(annotations: Path, questions: Path | None) -> _ChartQATruth:
    if not annotations.exists():
        raise DataError(f"ChartQA annotations not found: {annotations}")
    entries = chartqa_entries(annotations)
    return _ChartQATruth(annotations, {qid: (split, str(e["label"])) for qid, split, e in entries})


def _metric_chartqa(answers: list[Answer], truth: _ChartQATruth, _out: Path | None) -> ScoreResult:
    _check_known(answers, lambda a: a.key in truth.labels, truth.path)
    kept, dup = dedupe(answers)
    relaxed = {split: [] for split in CHARTQA_SPLITS}
    exact = []
    for a in kept:
        split, label = truth.labels[a.key]
        relaxed[split].append(float(relaxed_correct(a.text, label)))
        exact.append(float(exact_match(a.text, [label])))
    overall = _mean(relaxed["human"] + relaxed["augmented"])
    details = {"relaxed_accuracy": overall, "relaxed_human": _mean(relaxed["human"]),
               "relaxed_augmented": _mean(relaxed["augmented"]), "exact_match": _mean(exact)}  # fmt: skip
    return ScoreResult("chartqa", overall, len(kept), len(truth.labels) - len(kept), dup, details)


# ---------------------------------------------------------------- DocVQA and InfographicVQA

def docvqa_entries(path: Path, what: str) -> list[tuple[str, dict]]:
    """(where, entry) of a DocVQA/InfoVQA release file's `data` list (each has a questionId)."""
    data = _list_field(read_json(path, what), "data", path)
    for i, e in enumerate(data):
        _require(e, ("questionId", "question"), f"{path}: data[{i}]")
    return [(f"{path}: data[{i}]", e) for i, e in enumerate(data)]


@dataclass
class _DocTruth:
    path: Path
    answers: dict[str, list[str]]


def _doc_loader(what: str):
    def load(annotations: Path, questions: Path | None) -> _DocTruth:
        answers = {}
        for where, e in docvqa_entries(annotations, what):
            gts = e.get("answers")
            if not isinstance(gts, list) or not gts or not all(isinstance(g, str) for g in gts):
                raise DataError(f"{where}: 'answers' must be a non-empty list of strings (the test split has none)")
            answers[str(e["questionId"])] = gts
        return _DocTruth(annotations, answers)

    return load


def _doc_metric(name: str):
    def metric(answers: list[Answer], truth: _DocTruth, _out: Path | None) -> ScoreResult:
        _check_known(answers, lambda a: a.key in truth.answers, truth.path)
        kept, dup = dedupe(answers)
        scores = [anls(a.text, truth.answers[a.key]) for a in kept]
        exact = [float(exact_match(a.text, truth.answers[a.key])) for a in kept]
        overall = _mean(scores)
        return ScoreResult(name, overall, len(kept), len(truth.answers) - len(kept), dup,
                           {"anls": overall, "exact_match": _mean(exact)})  # fmt: skip

    return metric


def _identity(text: str) -> str:
    return text


BENCHMARKS = (
    Benchmark(
        "chartqa", "ChartQA test (human + augmented): relaxed accuracy (pix2struct)",
        "the release's test folder ('ChartQA Dataset/test': test_human.json, test_augmented.json)",
        _load_chartqa, _identity, _metric_chartqa, prompt_suffix=SHORT_ANSWER,
    ),
    Benchmark(
        "docvqa", "DocVQA val: ANLS (RRC script)", "val/val_v1.0.json",
        _doc_loader("DocVQA annotations"), _identity, _doc_metric("docvqa"), prompt_suffix=SHORT_ANSWER,
    ),
    Benchmark(
        "infovqa", "InfographicVQA val: ANLS (RRC script)", "infographicsVQA_val_v1.0_withQT.json",
        _doc_loader("InfographicVQA annotations"), _identity, _doc_metric("infovqa"), prompt_suffix=SHORT_ANSWER,
    ),
)  # fmt: skip
