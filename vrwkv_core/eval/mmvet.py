"""MM-Vet: no local score (a GPT-4 grader scores it); scoring writes the grader's input file.

    vrwkv eval score mmvet --answers answers.jsonl --annotations mm-vet/mm-vet.json --submission results.json

As LLaVA's convert_mmvet_for_eval.py: {"v1_<question_id>": answer text, verbatim}, for
LLaVA's llava-mm-vet.jsonl ids 0-217. The annotations ({"v1_0": {imagename, capability,
question, answer}, ...}) only check the ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vrwkv_core.errors import DataError
from vrwkv_core.eval.answers import Answer, dedupe
from vrwkv_core.eval.benchmarks import Benchmark, ScoreResult, _check_known, read_json
from vrwkv_core.fsutil import atomic_write_text

__all__ = ["BENCHMARKS"]


@dataclass
class _MMVetTruth:
    path: Path
    ids: set[str]


def _load(annotations: Path, questions: Path | None) -> _MMVetTruth:
    data = read_json(annotations, "MM-Vet annotations")
    if not isinstance(data, dict):
        raise DataError(f"{annotations}: expected a JSON object {{\"v1_0\": {{...}}, ...}}")
    return _MMVetTruth(annotations, set(data))


def _metric(answers: list[Answer], truth: _MMVetTruth, out: Path | None) -> ScoreResult:
    _check_known(answers, lambda a: f"v1_{a.key}" in truth.ids, truth.path)
    kept, dup = dedupe(answers)
    result = {f"v1_{a.key}": a.text for a in kept}
    assert out is not None
    atomic_write_text(out, json.dumps(result, indent=2))
    return ScoreResult("mmvet", None, len(kept), len(truth.ids) - len(kept), dup,
                       {"submission": str(out), "written": len(result)})  # fmt: skip


def _identity(text: str) -> str:
    return text


BENCHMARKS = (
    Benchmark(
        "mmvet", "MM-Vet: writes the GPT-4 grader's input (no local score)", "mm-vet/mm-vet.json",
        _load, _identity, _metric, writes_submission=True, submission_suffix=".mmvet.json",
    ),
)  # fmt: skip
