"""Evaluation: benchmark registry, official metrics, LLaVA answer files.

`vrwkv eval score BENCH --answers FILE --annotations PATH` is `get_benchmark(BENCH).score(...)`.
Answer generation (`vrwkv eval --model ...`) is a later piece; it reads `Benchmark.prompt_suffix`.
"""

from vrwkv_core.eval.answers import Answer, dedupe, read_answers, write_answers
from vrwkv_core.eval.benchmarks import BENCHMARKS, Benchmark, ScoreResult, get_benchmark
from vrwkv_core.eval.normalize import normalize_answer

__all__ = [
    "BENCHMARKS",
    "Answer",
    "Benchmark",
    "ScoreResult",
    "dedupe",
    "get_benchmark",
    "normalize_answer",
    "read_answers",
    "write_answers",
]
