"""Answer generation for the benchmarks: `vrwkv eval --model M --benchmark B --data-root DIR --out OUT`.

Reads a benchmark's questions (where they are, their formats and the prompt styles:
`questions.py`), answers greedily in RNN mode with continuous batching
(`generate_many`), appends each answer to `OUT/answers.jsonl` as soon as it is finished
(LLaVA fields; flushed, so a crash loses only the answers in flight), then scores the
file with the benchmark's official metric and writes `OUT/scores.json`.

Resume and shards: answered question ids are read back from every answer file in OUT
and skipped (a truncated last line from a crash is dropped and the file repaired).
`shard=(i, n)` answers every n-th question starting at i (0-based) into
`OUT/answers.shard-{i}-of-{n}.jsonl` and marks it done with `.done`; when all n are done
(or on `merge_and_score`), the shard files are merged into `OUT/answers.jsonl` in
question order and scored. `OUT/run.json` records the benchmark, data root, model and
prompt style, so a rerun cannot mix answers of two setups and `vrwkv eval merge` knows
what to score.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PIL import Image

from vrwkv_core.checkpoint import read_recipe
from vrwkv_core.config import RWKV_VERSIONS
from vrwkv_core.data.conversation import blank_image_ids, left_pad
from vrwkv_core.errors import DataError, VrwkvError
from vrwkv_core.eval.answers import Answer, parse_answer_line, write_answers
from vrwkv_core.eval.benchmarks import Benchmark, ScoreResult, get_benchmark
from vrwkv_core.eval.questions import (
    PROMPT_STYLES,
    EvalPaths,
    Question,
    answer_prompt,
    answers_text_only,
    encode_prompt,
    question_text,
    resolve_paths,
)
from vrwkv_core.eval.readers import read_questions
from vrwkv_core.fsutil import atomic_path, atomic_write_text
from vrwkv_core.infer.chat import load_image
from vrwkv_core.infer.loading import load_model
from vrwkv_core.infer.sampling import GenerationConfig
from vrwkv_core.model.families import family
from vrwkv_core.progress import Progress
from vrwkv_core.textio import inside, not_utf8, read_text
from vrwkv_core.tokenizer import default_tokenizer

if TYPE_CHECKING:
    from vrwkv_core.tokenizer import RWKVTokenizer

ANSWERS = "answers.jsonl"
RUN_FILE = "run.json"
SCORES = "scores.json"
DEFAULT_MAX_NEW_TOKENS = 128  # the research eval scripts' default; answers are a word or a letter
_SHARD_FILE = re.compile(r"^answers\.shard-(\d+)-of-(\d+)\.jsonl$")


# ---------------------------------------------------------------- shards and answer files

def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"I/N" (0 <= I < N) -> (I, N); None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise VrwkvError(f"--shard {text!r}: expected I/N with 0 <= I < N", hint="e.g. --shard 0/4 ... --shard 3/4")
    return int(m.group(1)), int(m.group(2))


def shard_slice(items: Sequence[Any], shard: tuple[int, int] | None) -> list[Any]:
    """Shard i of n: items i, i+n, i+2n, ... (interleaved, so sorted files split evenly)."""
    if shard is None:
        return list(items)
    i, n = shard
    return list(items[i::n])


def answers_path(out: str | Path, shard: tuple[int, int] | None = None) -> Path:
    """OUT/answers.jsonl, or OUT/answers.shard-I-of-N.jsonl."""
    return Path(out) / (ANSWERS if shard is None else f"answers.shard-{shard[0]}-of-{shard[1]}.jsonl")


def _done_marker(out: Path, shard: tuple[int, int]) -> Path:
    return out / f"answers.shard-{shard[0]}-of-{shard[1]}.done"


def read_answer_file(path: str | Path, repair: bool = False) -> list[Answer]:
    """Answers of a JSONL file that may end in a line cut by a crash: that line is ignored,
    and with `repair` removed from the file (only the file's own writer may repair it).
    Any other malformed line is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = len(data)
    if data and not data.endswith(b"\n"):
        last_nl = data.rfind(b"\n") + 1
        try:
            parse_answer_line(data[last_nl:].decode("utf-8"), path, 0)
            if repair:
                with path.open("ab") as f:
                    f.write(b"\n")
        except (DataError, UnicodeDecodeError):
            end = last_nl
            if repair:
                with path.open("r+b") as f:
                    f.truncate(last_nl)
    try:
        text = data[:end].decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, data, err) from None
    answers = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            answers.append(parse_answer_line(raw, path, n))
    return answers


def answer_files(out: str | Path) -> list[Path]:
    """OUT/answers.jsonl (if present) then the shard files, in (N, I) order."""
    out = Path(out)
    shards = sorted((tuple(int(g) for g in m.groups())[::-1], p) for p in out.glob("answers.shard-*-of-*.jsonl")
                    if (m := _SHARD_FILE.match(p.name)))  # fmt: skip
    return ([out / ANSWERS] if (out / ANSWERS).is_file() else []) + [p for _, p in shards]


def _key_function(questions: Sequence[Question]) -> Callable[[Any], str]:
    """How answers are matched to questions: by id, or by (id, prompt) when ids repeat
    (LLaVA's TextVQA file puts the image id in question_id)."""
    ids = [str(q.question_id) for q in questions]
    if len(set(ids)) == len(ids):
        return lambda x: str(x.question_id)
    return lambda x: f"{x.question_id}\x00{x.prompt}"


def merge_answers(out: str | Path, questions: Sequence[Question], bench: Benchmark, style: str) -> tuple[Path, int]:
    """Every answer file in OUT -> OUT/answers.jsonl in question order (first answer per
    question wins; answers to unknown questions go last). Returns (path, answers written)."""
    out = Path(out)
    keyed = [_Keyed(q.question_id, answer_prompt(q, bench, style)) for q in questions]
    key = _key_function(questions)
    order = {key(k): i for i, k in reversed(list(enumerate(keyed)))}
    seen: dict[str, Answer] = {}
    for path in answer_files(out):
        for a in read_answer_file(path):
            seen.setdefault(key(a), a)
    merged = sorted(seen.values(), key=lambda a: order.get(key(a), len(order)))
    target = out / ANSWERS
    with atomic_path(target, unique=True) as tmp:  # two shards may merge at once
        write_answers(tmp, merged)
    return target, len(merged)


@dataclass(frozen=True)
class _Keyed:
    question_id: int | str
    prompt: str


# ---------------------------------------------------------------- the run

@dataclass
class EvalReport:
    """What one `vrwkv eval` call did."""

    benchmark: str
    out: Path
    answers_file: Path
    """The file this run appended to."""
    n_questions: int = 0
    """Questions in this run's scope (after --limit and --shard)."""
    n_answered: int = 0
    """Answered by this run."""
    n_skipped: int = 0
    """Already answered in OUT (resume)."""
    n_missing_images: int = 0
    """Questions whose image is missing or unreadable (no answer written)."""
    n_text_only: int = 0
    """Questions without an image left unanswered, as v7.00's eval leaves them (ScienceQA)."""
    missing_examples: list[str] = field(default_factory=list)
    generate_s: float = 0.0
    """Seconds spent generating (model loading excluded)."""
    shard: tuple[int, int] | None = None
    pending_shards: list[int] = field(default_factory=list)
    """Shards not finished yet (when this run is one shard)."""
    merged: Path | None = None
    """OUT/answers.jsonl once merged."""
    n_merged: int = 0
    """Answers in the merged file."""
    score: ScoreResult | None = None
    scores_file: Path | None = None

    @property
    def questions_per_s(self) -> float | None:
        return self.n_answered / self.generate_s if self.n_answered and self.generate_s > 0 else None

    def shard_json(self) -> dict[str, Any]:
        """--json of a shard that did not merge."""
        assert self.shard is not None
        return {"benchmark": self.benchmark, "shard": f"{self.shard[0]}/{self.shard[1]}", "merged": False,
                "answered": self.n_answered, "skipped": self.n_skipped, "missing_images": self.n_missing_images,
                "pending_shards": self.pending_shards}  # fmt: skip


def model_id_for(spec: Any) -> str:
    """A short model name for answer lines: dir -> its last two path parts, file -> its stem."""
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        return "/".join(p.resolve().parts[-2:])
    return p.stem if p.is_file() else str(spec)


def default_prompt_style(model: Any) -> str | None:
    """The prompt style a model was trained with: v6 for a VisualRWKV v6.0 (RWKV-6, x060)
    model, else v7. `model`: a loaded model, or a spec (only our model dirs are read, from
    config.yaml; None for anything else)."""
    if isinstance(model, (str, Path)):
        path = Path(model).expanduser()
        if not (path.is_dir() and (path / "config.yaml").is_file()):
            return None
        version = read_recipe(path).model.rwkv.version
    else:
        version = getattr(getattr(getattr(model, "config", None), "rwkv", None), "version", RWKV_VERSIONS[0])
    return family(version).prompt_style


def _check_run_record(out: Path, record: dict[str, Any]) -> None:
    """Refuses to add answers of another setup to OUT; then (re)writes OUT/run.json."""
    path = out / RUN_FILE
    if path.is_file() and answer_files(out):
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        for k in ("benchmark", "model_id", "prompt_style", "max_new_tokens", "prefill_pad", "quant"):
            if old.get(k) != record.get(k) and (k in old or record.get(k) is not None):
                raise VrwkvError(
                    f"{out} holds answers made with {k}={old[k]!r}, this run has {k}={record[k]!r}",
                    hint="use another --out, or delete its answers*.jsonl to start over",
                )
    atomic_write_text(path, json.dumps(record, indent=1) + "\n", unique=True)  # every shard writes it


def run_eval(
    model: Any,
    benchmark: str,
    data_root: str | Path,
    out: str | Path,
    *,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    prompt_style: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    download: bool = False,
    wkv_backend: str | None = None,
    prefill_pad: bool = True,
    quant: str | None = None,
    fast_batch: bool = True,
    progress: Progress | None = None,
    adapter: str | Path | None = None,
    state: str | Path | None = None,
    merge_adapter: bool = False,
) -> EvalReport:
    """Answers the benchmark's questions not yet answered in `out`, then merges and scores
    (unless this is a shard and others are unfinished). `model`: a --model spec (dir,
    .pth, registry name) or a loaded VisualRWKV. `prompt_style` None: the model's own
    (`default_prompt_style`). `prefill_pad`: pad each prompt as the model's release did
    (`Family.prefill_pad`; v7.00: to a multiple of 16 with token 261). `adapter`, `state`,
    `merge_adapter`: as `load_model`'s. `quant` (fp16, int8, int4) quantizes the language model's
    weights; a run's answers are not mixed with those of another `quant`. `fast_batch` decodes
    fp32 rows through oneDNN-packed matrices (`use_batched_route`: ~1.8x faster at batch 8 on
    CPU, and a row gets the same bits at any `batch_size`, which MKL's route does not promise)."""
    bench = get_benchmark(benchmark)
    load_kw = {"download": download, "wkv_backend": wkv_backend, "adapter": adapter, "state": state,
               "merge_adapter": merge_adapter}  # fmt: skip
    if prompt_style is not None and prompt_style not in PROMPT_STYLES:
        raise VrwkvError(f"unknown prompt style {prompt_style!r}", hint="use v7, v6 or llava")
    if batch_size < 1:
        raise VrwkvError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise VrwkvError(f"--limit must be >= 1, got {limit}")
    paths = resolve_paths(bench.name, data_root)
    questions = read_questions(bench.name, paths.questions)
    if not questions:
        raise DataError(f"no questions in {paths.questions}", hint="check --data-root and the question file")
    if limit is not None:
        questions = questions[:limit]
    mine = shard_slice(questions, shard)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quant_kw = {"quant": quant} if quant else {}  # (loaders without quantization stay callable)
    is_spec = isinstance(model, (str, Path))
    model_id = model_id_for(model) if is_spec else type(model).__name__
    vlm = None if is_spec else model
    if prompt_style is None:
        prompt_style = default_prompt_style(model)
        if prompt_style is None:  # a checkpoint file or a registry name: its tensors tell
            vlm = load_model(model, device=device, dtype=dtype, **load_kw, **quant_kw)
            prompt_style = default_prompt_style(vlm)
    record = {"benchmark": bench.name, "data_root": str(paths.root.resolve()), "model": str(model),
              "model_id": model_id, "prompt_style": prompt_style, "max_new_tokens": max_new_tokens,
              "prefill_pad": prefill_pad, **({"quant": quant} if quant else {})}
    record.update({k: str(v) for k, v in (("adapter", adapter), ("state", state)) if v is not None})
    _check_run_record(out, record)
    target = answers_path(out, shard)
    if shard is not None:
        _done_marker(out, shard).unlink(missing_ok=True)
    report = EvalReport(bench.name, out, target, n_questions=len(mine), shard=shard)

    key = _key_function(questions)
    done: set[str] = set()
    for path in answer_files(out):
        done.update(key(a) for a in read_answer_file(path, repair=path == target))
    todo = [q for q in mine if key(_Keyed(q.question_id, answer_prompt(q, bench, prompt_style))) not in done]
    report.n_skipped = len(mine) - len(todo)
    if not answers_text_only(bench, prompt_style):  # as the original eval: image questions only
        report.n_text_only = sum(q.image is None for q in todo)
        todo = [q for q in todo if q.image is not None]
    escaping = [q for q in todo if q.image is not None and q.image_data is None and inside(paths.images, q.image) is None]
    for q in escaping:
        _note_missing(report, progress, f"question {q.question_id}: image path {q.image!r} escapes {paths.images}")
    todo = [q for q in todo if q not in escaping]
    absent = [q for q in todo if not _has_image(q, paths)]
    for q in absent:
        _note_missing(report, progress, f"{paths.images / q.image}: image file not found (question {q.question_id})")
    todo = [q for q in todo if _has_image(q, paths)]

    if todo:
        if vlm is None:
            vlm = load_model(model, device=device, dtype=dtype, **load_kw, **quant_kw)
        if fast_batch:
            vlm.rwkv.use_batched_route()
        pad = vlm.family.prefill_pad if prefill_pad and hasattr(vlm, "family") else 0
        _generate(vlm, bench, todo, paths, target, model_id, prompt_style, max_new_tokens, batch_size, report,
                  progress, len(absent), pad)  # fmt: skip

    if shard is not None:
        atomic_write_text(_done_marker(out, shard), json.dumps(report.shard_json()) + "\n")
        report.pending_shards = [i for i in range(shard[1]) if not _done_marker(out, (i, shard[1])).is_file()]
        if report.pending_shards:
            return report
    report.merged, report.n_merged = merge_answers(out, questions, bench, prompt_style)
    report.score, report.scores_file = score_answers(bench, paths, report.merged)
    return report


def _has_image(q: Question, paths: EvalPaths) -> bool:
    """False only for an image question whose image file is not there."""
    return q.image is None or q.image_data is not None or (paths.images / q.image).is_file()


def _note_missing(report: EvalReport, progress: Progress | None, message: str) -> None:
    report.n_missing_images += 1
    if len(report.missing_examples) < 5:
        report.missing_examples.append(message)
        if progress is not None:
            progress.log(f"missing image: {message}")


def _generate(vlm: Any, bench: Benchmark, todo: list[Question], paths: EvalPaths, target: Path, model_id: str,
              style: str, max_new_tokens: int, batch_size: int, report: EvalReport, progress: Progress | None,
              n_absent: int, pad: int = 0) -> None:  # fmt: skip
    """Answers `todo`, appending each answer to `target` as it finishes; prompts are left-padded
    to a multiple of `pad` (0: none)."""
    import importlib

    # the module (the package re-exports a function of the same name); looked up at call time
    infer = importlib.import_module("vrwkv_core.infer.generate")
    tok = default_tokenizer()
    # Greedy; the research scripts cut the decoded answer at the first "\n\n" and strip it.
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_strings=("\n\n",))
    inputs = _LazyInputs(lambda i: _build_input(vlm, tok, bench, todo[i], paths, style, pad), len(todo),
                         ahead=batch_size)  # fmt: skip
    if progress is not None:
        progress.start(f"{bench.name}: answering", total=len(todo) + n_absent)
        progress.update(n_absent)
    t0 = time.perf_counter()
    try:
        for i, result in infer.generate_many(vlm, tok, inputs.prompts, inputs.images, config, batch_size):
            q = todo[i]
            if i in inputs.bad:
                _note_missing(report, progress, f"{inputs.bad[i]} (question {q.question_id})")
            else:
                answer = Answer(q.question_id, result.text.strip(), answer_prompt(q, bench, style), model_id)
                write_answers(target, [answer], append=True)
                report.n_answered += 1
            if progress is not None:
                elapsed = time.perf_counter() - t0
                progress.update(1, **{"q/s": report.n_answered / elapsed if elapsed > 0 else 0.0})
    finally:
        report.generate_s = time.perf_counter() - t0
        inputs.close()
        if progress is not None:
            progress.close()


def _build_input(vlm: Any, tok: RWKVTokenizer, bench: Benchmark, q: Question, paths: EvalPaths,
                 style: str, pad: int = 0) -> tuple[list[int], dict | None, str | None]:  # fmt: skip
    """(prompt ids, {tower: [N,3,S,S]} or None, error): an unreadable image is replaced by a
    blank one so the batch goes on; its answer is dropped and counted."""
    text = question_text(q, bench, style)
    P = vlm.tokens_per_image
    if q.image is None:
        ids = encode_prompt(text, tok, P, 0, style)
        if getattr(getattr(vlm, "family", None), "blank_image_rows", False):  # v6.0: zero rows before the text
            ids = blank_image_ids(P) + ids
        return left_pad(len(ids), pad) + ids, None, None
    error = None
    try:
        image = load_image(q.image_data, name=q.image) if q.image_data is not None else load_image(paths.images / q.image)
    except DataError as err:
        error, image = str(err), Image.new("RGB", (32, 32))
    views = vlm.image_processor.views(image)
    ids = encode_prompt(text, tok, P, len(views), style)
    return left_pad(len(ids), pad) + ids, vlm.image_processor.batch(views), error


class _LazyInputs:
    """`prompts[i]` / `images[i]` for generate_many, built when first asked for, with the
    next `ahead` built in background threads (image decoding overlaps the model)."""

    def __init__(self, build: Callable[[int], tuple], n: int, ahead: int) -> None:
        self._build, self._n, self._ahead = build, n, ahead
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._futures: dict[int, Future] = {}
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self._next = 0
        self.bad: dict[int, str] = {}
        self.prompts = _Column(self, 0)
        self.images = _Column(self, 1)

    def get(self, i: int) -> tuple:
        if i in self._cache:
            return self._cache[i]
        while self._next < min(i + 1 + self._ahead, self._n):
            self._futures[self._next] = self._pool.submit(self._build, self._next)
            self._next += 1
        future = self._futures.pop(i, None)
        item = future.result() if future is not None else self._build(i)
        if item[2] is not None:
            self.bad[i] = item[2]
        self._cache[i] = item
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return item

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Column(Sequence):
    def __init__(self, inputs: _LazyInputs, k: int) -> None:
        self._inputs, self._k = inputs, k

    def __len__(self) -> int:
        return self._inputs._n

    def __getitem__(self, i: Any) -> Any:
        return self._inputs.get(i)[self._k]


# ---------------------------------------------------------------- scoring and merging

def score_answers(bench: Benchmark, paths: EvalPaths, answers: Path) -> tuple[ScoreResult | None, Path | None]:
    """Scores the merged file and writes scores.json beside it; (None, None) when empty."""
    if not read_answer_file(answers):
        return None, None
    result = bench.score(answers, paths.annotations, paths.score_questions)
    scores = answers.parent / SCORES
    atomic_write_text(scores, json.dumps(result.to_json(), indent=1) + "\n", unique=True)
    return result, scores


def merge_and_score(out: str | Path) -> EvalReport:
    """`vrwkv eval merge`: merges OUT's shard files into answers.jsonl and scores it,
    using the benchmark and data root recorded in OUT/run.json."""
    out = Path(out)
    record_path = out / RUN_FILE
    if not record_path.is_file():
        raise DataError(f"{record_path} not found: {out} is not a `vrwkv eval` output folder")
    try:
        record = json.loads(read_text(record_path, what="run record"))
        record["benchmark"], record["data_root"]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise DataError(f"{record_path}: damaged (not the JSON object `vrwkv eval` writes)",
                        hint="rerun `vrwkv eval` with the same --out to rewrite it") from None
    if not answer_files(out):
        raise DataError(f"{out}: no answers.jsonl or answers.shard-*-of-*.jsonl to merge")
    bench = get_benchmark(record["benchmark"])
    paths = resolve_paths(bench.name, record["data_root"])
    questions = read_questions(bench.name, paths.questions)
    report = EvalReport(bench.name, out, out / ANSWERS, n_questions=len(questions))
    for p in out.glob("answers.shard-*-of-*.jsonl"):
        m = _SHARD_FILE.match(p.name)
        if m and not _done_marker(out, (int(m.group(1)), int(m.group(2)))).is_file():
            report.pending_shards.append(int(m.group(1)))
    report.pending_shards.sort()
    report.merged, report.n_merged = merge_answers(out, questions, bench, record.get("prompt_style", "v7"))
    report.score, report.scores_file = score_answers(bench, paths, report.merged)
    return report


__all__ = [
    "EvalReport",
    "answer_files",
    "answers_path",
    "default_prompt_style",
    "merge_and_score",
    "merge_answers",
    "model_id_for",
    "parse_shard",
    "read_answer_file",
    "run_eval",
    "score_answers",
    "shard_slice",
]
