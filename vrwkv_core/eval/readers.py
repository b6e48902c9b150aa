"""Question readers for the benchmarks read from their release files rather than a LLaVA JSONL.

`read_questions(benchmark, path)` is what answer generation calls: MMBench's TSV (images
embedded as base64, LLaVA's hint/question/options prompt, every row once, question_id =
index), ChartQA's test_human.json + test_augmented.json (ids `human_<i>`, `augmented_<i>`),
DocVQA's and InfoVQA's `{"data": [...]}` (question_id = questionId); any other benchmark's
file goes through `questions.load_questions`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from pathlib import Path

from vrwkv_core.errors import DataError
from vrwkv_core.eval.benchmarks import get_benchmark
from vrwkv_core.eval.docqa import chartqa_entries, docvqa_entries
from vrwkv_core.eval.mmbench import mmbench_prompt, read_tsv
from vrwkv_core.eval.questions import Question, load_questions

__all__ = ["read_questions"]


def read_questions(benchmark: str, path: str | Path) -> list[Question]:
    """The questions of `benchmark` from its question file `path`."""
    reader = _READERS.get(get_benchmark(benchmark).name, load_questions)
    return reader(Path(path))


def _mmbench(path: Path) -> list[Question]:
    out = []
    for row in read_tsv(path):
        image = row.get("image")
        if image is None:
            raise DataError(f"{path}:{row.line}: no 'image' (base64) in row index {row.index}")
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"{path}:{row.line}: 'image' is not valid base64 (row index {row.index})") from None
        out.append(Question(row.index, mmbench_prompt(row), f"{path.name}:{row.index}", image_data=data))
    return out


def _chartqa(path: Path) -> list[Question]:
    return [Question(qid, str(e["query"]), str(e["imgname"])) for qid, _, e in chartqa_entries(path)]


def _doc_reader(image_key: str) -> Callable[[Path], list[Question]]:
    def read(path: Path) -> list[Question]:
        out = []
        for where, e in docvqa_entries(path, "question file"):
            if not isinstance(e.get(image_key), str):
                raise DataError(f"{where}: no '{image_key}'")
            qid = e["questionId"]
            if isinstance(qid, bool) or not isinstance(qid, (int, str)):
                raise DataError(f"{where}: 'questionId' must be an int or a string")
            out.append(Question(qid, str(e["question"]), e[image_key]))
        return out

    return read


_READERS: dict[str, Callable[[Path], list[Question]]] = {
    "mmbench": _mmbench,
    "mmbench-cn": _mmbench,
    "chartqa": _chartqa,
    "docvqa": _doc_reader("image"),
    "infovqa": _doc_reader("image_local_name"),
}
