"""Evaluation: benchmark registry, questions and prompts, answer generation, official metrics.

`vrwkv eval --model M --benchmark B ...` is `run_eval` (generate.py: batched, resumable,
sharded answering in RNN mode, then scoring); `vrwkv eval merge OUT` is `merge_and_score`;
`vrwkv eval score BENCH --answers FILE --annotations PATH` is `get_benchmark(BENCH).score(...)`.
Where each benchmark's files live and how its prompts are built: questions.py.
`run_eval` and `merge_and_score` load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from vrwkv_core.eval.answers import Answer, dedupe, read_answers, write_answers
from vrwkv_core.eval.benchmarks import BENCHMARKS, Benchmark, ScoreResult, get_benchmark
from vrwkv_core.eval.normalize import normalize_answer

# The benchmarks added beside the first seven live in their own modules (which use
# benchmarks.py's helpers); they join the one registry here, before anything can look one up.
from vrwkv_core.eval import docqa, mmbench, mme, mmvet, vizwiz  # isort: skip

for _bench in (*mme.BENCHMARKS, *mmbench.BENCHMARKS, *vizwiz.BENCHMARKS, *mmvet.BENCHMARKS, *docqa.BENCHMARKS):
    BENCHMARKS.setdefault(_bench.name, _bench)
del _bench

_LAZY = {"run_eval": "vrwkv_core.eval.generate", "merge_and_score": "vrwkv_core.eval.generate"}

__all__ = [
    "BENCHMARKS",
    "Answer",
    "Benchmark",
    "ScoreResult",
    "dedupe",
    "get_benchmark",
    "merge_and_score",
    "normalize_answer",
    "read_answers",
    "run_eval",
    "write_answers",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vrwkv_core.eval' has no attribute {name!r}")
