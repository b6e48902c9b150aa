"""Per-question metrics of the official scorers, as pure functions of strings.

Sources (rules re-implemented, not copied):
- VQA soft accuracy: GT-Vision-Lab/VQA `vqaEval.py` (master): for each of the n human
  answers, min(#other humans equal to the prediction / 3, 1), averaged over the n.
- TextVQA: LLaVA `m4c_evaluator.TextVQAAccuracyEvaluator` (both sides through the EvalAI
  processor, `normalize_answer`).
- GQA: LLaVA `scripts/convert_gqa_for_eval.py` (rstrip '.', lower) then GQA's exact match.
- ScienceQA: LLaVA `llava/eval/eval_science_qa.py` letter extraction.
- POPE: LLaVA `llava/eval/eval_pope.py` yes/no parsing and confusion-matrix metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from vrwkv_core.eval.normalize import normalize_answer, process_digit_article, process_punctuation

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
SCIENCEQA_FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def soft_accuracy(prediction: str, humans: Sequence[str]) -> float:
    """VQA accuracy of one (already processed) prediction against processed human answers:
    leave each human out in turn, score min(matches among the others / 3, 1), average."""
    if not humans:
        raise ValueError("soft_accuracy needs at least one human answer")
    matches = sum(h == prediction for h in humans)
    total = 0.0
    for h in humans:
        others = matches - (h == prediction)
        total += min(1.0, others / 3)
    return total / len(humans)


def vqav2_accuracy(text: str, humans: Sequence[str]) -> float:
    """VQAv2 val accuracy of a raw model answer.

    The prediction first goes through the EvalAI processor (what LLaVA submits), then
    vqaEval's rule: strip both sides; only when the humans do not all agree are the humans
    and the prediction run through punctuation and digit/article processing.
    """
    pred = _strip_ws(normalize_answer(text))
    gts = [_strip_ws(h) for h in humans]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(h)) for h in gts]
        pred = process_digit_article(process_punctuation(pred))
    return soft_accuracy(pred, gts)


def textvqa_accuracy(text: str, humans: Sequence[str]) -> float:
    """TextVQA accuracy (LLaVA's m4c evaluator): both sides through `normalize_answer`."""
    return soft_accuracy(normalize_answer(text), [normalize_answer(h) for h in humans])


def gqa_prediction(text: str) -> str:
    """LLaVA's GQA conversion: trailing periods stripped, lower-cased (no other cleanup)."""
    return text.rstrip(".").lower()


def scienceqa_letter(text: str | None) -> str:
    """The option letter the official ScienceQA scorer (LLaVA's, which the VisualRWKV originals
    use) reads from an answer, or "FAILED": the bare letter, "X. ..." at the start, else exactly
    one match of `The answer is X.` (any character after the letter); two matches fail. A missing
    answer (None) fails."""
    if text is None:
        return SCIENCEQA_FAILED
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else SCIENCEQA_FAILED


def scienceqa_correct(text: str | None, n_choices: int, answer_index: int) -> bool:
    """True when the extracted letter is one of the problem's choices and the right one."""
    letter = scienceqa_letter(text)
    valid = SCIENCEQA_OPTIONS[:n_choices]
    return letter in valid and valid.index(letter) == answer_index


def pope_yes_no(text: str) -> str:
    """POPE's parsing: keep the text before the first '.', drop commas, split on spaces;
    'No', 'no' or 'not' among the words means "no", anything else "yes"."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Iterable[str], labels: Iterable[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class.

    `predictions` are "yes"/"no" (from `pope_yes_no`); a label is negative only when it is
    exactly "no", as in the official script. A ratio whose denominator is 0 is 0.0 (the
    official script raises ZeroDivisionError there).
    """
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels, strict=True):
        pos_pred, pos_label = pred != "no", label != "no"
        if pos_pred and pos_label:
            tp += 1
        elif pos_pred:
            fp += 1
        elif not pos_label:
            tn += 1
        else:
            fn += 1
    total = tp + fp + tn + fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, total),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, total),
    }


def shapes_correct(text: str, accepted: Iterable[str]) -> bool:
    """Exact match after `normalize_answer` on both sides."""
    return normalize_answer(text) in {normalize_answer(a) for a in accepted}


def _strip_ws(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0
