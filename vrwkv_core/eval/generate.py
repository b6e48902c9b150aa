"""Answer generation for the benchmarks: `vrwkv eval --model M --benchmark B --data-root DIR --out OUT`.

Reads a benchmark's questions from LLaVA-1.5's evaluation layout, builds each prompt,
answers greedily in RNN mode with continuous batching (`generate_many`), appends each
answer to `OUT/answers.jsonl` as soon as it is finished (LLaVA fields; flushed, so a
crash loses only the answers in flight), then scores the file with the benchmark's
official metric and writes `OUT/scores.json`.

Expected tree: `--data-root` is the benchmark's folder (or its parent, e.g. LLaVA's
`playground/data/eval`, when the folder has the name below). Paths are relative to it.

    benchmark      folder    questions                                   images        annotations
    textvqa        textvqa   llava_textvqa_val_v051_ocr.jsonl            train_images/ TextVQA_0.5.1_val.json
    vqav2          vqav2     v2_OpenEnded_mscoco_val2014_questions.json  val2014/      v2_mscoco_val2014_annotations.json
    vqav2-testdev  vqav2     llava_vqav2_mscoco_test-dev2015.jsonl       test2015/     llava_vqav2_mscoco_test2015.jsonl
    gqa            gqa       llava_gqa_testdev_balanced.jsonl            data/images/  data/testdev_balanced_questions.json
    scienceqa      scienceqa llava_test_CQM-A.json                       images/test/  ./ (problems.json, pid_splits.json)
    pope           pope      llava_pope_test.jsonl                       val2014/      coco/ (coco_pope_{adversarial,popular,random}.json)
    shapes         shapes    eval/questions.jsonl                        images/       eval/answers.json

Question files: LLaVA JSONL (`question_id`, `image`, `text`, optional `category`; the
text already ends with the benchmark's instruction), ScienceQA's JSON list (`id`,
optional `image`, `conversations[0].value`; the letter instruction is appended here, as
LLaVA's `--single-pred-prompt` does), or the official VQAv2 `{"questions": [...]}` file
(images `COCO_val2014_{image_id:012d}.jpg`). An instruction already at the end of a
question is never added twice. Questions without an image (ScienceQA text-only) are
answered from text alone.

Prompt styles: `v7` puts the image markers first (`User: <image>\\n{q}\\n\\nAssistant:`);
`v6` is VisualRWKV v6.0's "middle" prompt, `User: {q without the short-answer line}\\n<image>\\n{q}\\n\\nAssistant:`,
and, like v6.0's own eval, adds no letter instruction to ScienceQA.

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
import os
import re
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from vrwkv_core.data.conversation import IMAGE_MARKER, collapse_blank_lines, encode_generation_prompt, encode_turn_text
from vrwkv_core.data.fsutil import atomic_write_text
from vrwkv_core.errors import DataError, VrwkvError
from vrwkv_core.eval.answers import Answer, _parse_line, write_answers
from vrwkv_core.eval.benchmarks import OPTION_LETTER, SHORT_ANSWER, Benchmark, ScoreResult, get_benchmark
from vrwkv_core.progress import Progress

if TYPE_CHECKING:
    from vrwkv_core.tokenizer import RWKVTokenizer

PROMPT_STYLES = ("v7", "v6")
ANSWERS = "answers.jsonl"
RUN_FILE = "run.json"
SCORES = "scores.json"
DEFAULT_MAX_NEW_TOKENS = 128  # the research eval scripts' default; answers are a word or a letter
_SHARD_FILE = re.compile(r"^answers\.shard-(\d+)-of-(\d+)\.jsonl$")


# ---------------------------------------------------------------- where the files are

@dataclass(frozen=True)
class Layout:
    """Where one benchmark's files live inside its folder."""

    folder: str
    """The folder's name under LLaVA's playground/data/eval."""
    questions: str
    images: str
    annotations: str
    score_with_questions: bool = False
    """Pass the question file to the scorer as --questions (POPE needs its categories)."""


LAYOUTS: dict[str, Layout] = {
    "textvqa": Layout("textvqa", "llava_textvqa_val_v051_ocr.jsonl", "train_images", "TextVQA_0.5.1_val.json"),
    "vqav2": Layout("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json", "val2014",
                    "v2_mscoco_val2014_annotations.json", score_with_questions=True),
    "vqav2-testdev": Layout("vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015",
                            "llava_vqav2_mscoco_test2015.jsonl"),
    "gqa": Layout("gqa", "llava_gqa_testdev_balanced.jsonl", "data/images", "data/testdev_balanced_questions.json"),
    "scienceqa": Layout("scienceqa", "llava_test_CQM-A.json", "images/test", "."),
    "pope": Layout("pope", "llava_pope_test.jsonl", "val2014", "coco", score_with_questions=True),
    "shapes": Layout("shapes", "eval/questions.jsonl", "images", "eval/answers.json"),
}  # fmt: skip


@dataclass(frozen=True)
class EvalPaths:
    """A benchmark's files, resolved under --data-root."""

    root: Path
    questions: Path
    images: Path
    annotations: Path
    score_questions: Path | None


def resolve_paths(benchmark: str, data_root: str | Path) -> EvalPaths:
    """The benchmark's files under `data_root` (its folder, or the folder's parent);
    DataError naming the first missing one."""
    name = get_benchmark(benchmark).name
    layout = LAYOUTS[name]
    given = Path(data_root).expanduser()
    root = next((r for r in (given, given / layout.folder) if (r / layout.questions).is_file()), None)
    if root is None:
        raise DataError(
            f"{name}: question file not found: {given / layout.questions}",
            hint=f"--data-root is the {name} folder holding {layout.questions}, {layout.images}/ and "
                 f"{layout.annotations} (LLaVA: playground/data/eval/{layout.folder})",
        )  # fmt: skip
    paths = EvalPaths(root, root / layout.questions, root / layout.images, (root / layout.annotations),
                      root / layout.questions if layout.score_with_questions else None)  # fmt: skip
    if not paths.images.is_dir():
        raise DataError(f"{name}: image folder not found: {paths.images}")
    if not paths.annotations.exists():
        raise DataError(f"{name}: annotations not found: {paths.annotations}",
                        hint="answers are scored against it; `vrwkv eval score` scores an answer file later")  # fmt: skip
    return paths


# ---------------------------------------------------------------- questions

@dataclass(frozen=True)
class Question:
    """One benchmark question."""

    question_id: int | str
    text: str
    """As written in the question file, `<image>` markers removed."""
    image: str | None = None
    """Path relative to the image folder; None for a text-only question."""
    category: str | None = None


def load_questions(path: str | Path) -> list[Question]:
    """Questions of a LLaVA JSONL file, a ScienceQA-style JSON list, or the official VQAv2 JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"question file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, raw in enumerate(f, start=1):
                if raw.strip():
                    rows.append((f"{path}:{n}", _json(raw, f"{path}:{n}")))
        return [_llava_question(obj, where) for where, obj in rows]
    data = _json(path.read_text(encoding="utf-8"), str(path))
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        split = str(data.get("data_subtype", "val2014"))
        return [_vqav2_question(q, split, f"{path}: questions[{i}]") for i, q in enumerate(data["questions"])]
    if isinstance(data, list):
        return [_llava_question(q, f"{path}: [{i}]") for i, q in enumerate(data)]
    raise DataError(f"{path}: expected JSON lines, a JSON list, or an object with a 'questions' list")


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None


def _question_id(obj: dict, keys: tuple[str, ...], where: str) -> int | str:
    for key in keys:
        qid = obj.get(key)
        if isinstance(qid, (int, str)) and not isinstance(qid, bool):
            return qid
    raise DataError(f"{where}: no question id ({' or '.join(repr(k) for k in keys)})")


def _llava_question(obj: Any, where: str) -> Question:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
    qid = _question_id(obj, ("question_id", "id"), where)
    if isinstance(obj.get("text"), str):
        text = obj["text"]
    else:
        turns = obj.get("conversations")
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        if not isinstance(first.get("value"), str):
            raise DataError(f"{where}: no question ('text', or 'conversations' with a first 'value')")
        text = first["value"]
    image = obj.get("image")
    if isinstance(image, list):  # LLaVA training records hold a list; eval files one name
        image = image[0] if len(image) == 1 else None
    if image is not None and not isinstance(image, str):
        raise DataError(f"{where}: 'image' must be a file name")
    category = obj.get("category")
    return Question(qid, collapse_blank_lines(text.replace(IMAGE_MARKER, "")), image,
                    str(category) if category is not None else None)  # fmt: skip


def _vqav2_question(obj: Any, split: str, where: str) -> Question:
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not isinstance(obj.get("image_id"), int):
        raise DataError(f"{where}: expected an object with 'question_id', 'question' and an int 'image_id'")
    qid = _question_id(obj, ("question_id",), where)
    return Question(qid, obj["question"].strip(), f"COCO_{split}_{obj['image_id']:012d}.jpg")


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


# ---------------------------------------------------------------- prompts

def prompt_suffix(bench: Benchmark, style: str) -> str | None:
    """The instruction appended to each question; v6.0's eval added none to ScienceQA."""
    if style == "v6" and bench.prompt_suffix == OPTION_LETTER:
        return None
    return bench.prompt_suffix


def question_text(q: Question, bench: Benchmark, style: str = "v7") -> str:
    """The question with its instruction (added once)."""
    suffix = prompt_suffix(bench, style)
    if not suffix or q.text.rstrip().endswith(suffix):
        return q.text
    return f"{q.text}\n{suffix}"


def answer_prompt(q: Question, bench: Benchmark, style: str = "v7") -> str:
    """The answer file's `prompt` as LLaVA writes it: `<image>\\n` + question for image questions
    (ScienceQA's img_accuracy and TextVQA's matching read it)."""
    text = question_text(q, bench, style)
    return f"{IMAGE_MARKER}\n{text}" if q.image else text


def v6_turn_text(question: str, n_images: int = 1) -> str:
    """VisualRWKV v6.0's "middle" human turn: the question without the short-answer
    line, the image markers, then the whole question."""
    q = collapse_blank_lines(question.replace(IMAGE_MARKER, ""))
    if n_images == 0:
        return f"User: {q}\n\n"
    before = collapse_blank_lines(q.replace(SHORT_ANSWER, ""))
    middle = "\n".join([IMAGE_MARKER] * n_images)
    return f"User: {before}\n{middle}\n{q}\n\n" if before else f"User: {middle}\n{q}\n\n"


def encode_prompt(question: str, tokenizer: RWKVTokenizer, tokens_per_image: int, n_images: int = 1,
                  style: str = "v7") -> list[int]:  # fmt: skip
    """Prompt ids ending with `Assistant:` in the given style."""
    if style == "v7":
        return encode_generation_prompt(question, tokenizer, tokens_per_image, n_images)
    if style != "v6":
        raise VrwkvError(f"unknown prompt style {style!r}", hint="use v7 or v6")
    ids, _ = encode_turn_text(v6_turn_text(question, n_images), tokenizer, tokens_per_image)
    return ids + list(tokenizer.encode("Assistant:"))


# ---------------------------------------------------------------- answer files

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
            _parse_line(data[last_nl:].decode("utf-8"), path, 0)
            if repair:
                with path.open("ab") as f:
                    f.write(b"\n")
        except (DataError, UnicodeDecodeError):
            end = last_nl
            if repair:
                with path.open("r+b") as f:
                    f.truncate(last_nl)
    answers = []
    for n, raw in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if raw.strip():
            answers.append(_parse_line(raw, path, n))
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
    fd, tmp = tempfile.mkstemp(prefix=f".{ANSWERS}.", suffix=".tmp", dir=out)  # unique: two shards may merge at once
    os.close(fd)
    write_answers(tmp, merged)
    os.replace(tmp, target)
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


def _check_run_record(out: Path, record: dict[str, Any]) -> None:
    """Refuses to add answers of another setup to OUT; then (re)writes OUT/run.json."""
    path = out / RUN_FILE
    if path.is_file() and answer_files(out):
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        for k in ("benchmark", "model_id", "prompt_style", "max_new_tokens"):
            if k in old and old[k] != record[k]:
                raise VrwkvError(
                    f"{out} holds answers made with {k}={old[k]!r}, this run has {k}={record[k]!r}",
                    hint="use another --out, or delete its answers*.jsonl to start over",
                )
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


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
    prompt_style: str = "v7",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    download: bool = False,
    progress: Progress | None = None,
) -> EvalReport:
    """Answers the benchmark's questions not yet answered in `out`, then merges and scores
    (unless this is a shard and others are unfinished). `model`: a --model spec (dir,
    .pth, registry name) or a loaded VisualRWKV."""
    bench = get_benchmark(benchmark)
    if prompt_style not in PROMPT_STYLES:
        raise VrwkvError(f"unknown prompt style {prompt_style!r}", hint="use v7 or v6")
    if batch_size < 1:
        raise VrwkvError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise VrwkvError(f"--limit must be >= 1, got {limit}")
    paths = resolve_paths(bench.name, data_root)
    questions = load_questions(paths.questions)
    if limit is not None:
        questions = questions[:limit]
    mine = shard_slice(questions, shard)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    is_spec = isinstance(model, (str, Path))
    model_id = model_id_for(model) if is_spec else type(model).__name__
    _check_run_record(out, {"benchmark": bench.name, "data_root": str(paths.root.resolve()), "model": str(model),
                            "model_id": model_id, "prompt_style": prompt_style, "max_new_tokens": max_new_tokens})  # fmt: skip
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
    absent = [q for q in todo if q.image is not None and not (paths.images / q.image).is_file()]
    for q in absent:
        _note_missing(report, progress, f"{paths.images / q.image}: image file not found (question {q.question_id})")
    todo = [q for q in todo if q.image is None or (paths.images / q.image).is_file()]

    if todo:
        from vrwkv_core.infer.loading import load_model

        vlm = load_model(model, device=device, dtype=dtype, download=download) if is_spec else model
        _generate(vlm, bench, todo, paths, target, model_id, prompt_style, max_new_tokens, batch_size, report,
                  progress, len(absent))  # fmt: skip

    if shard is not None:
        atomic_write_text(_done_marker(out, shard), json.dumps(report.shard_json()) + "\n")
        report.pending_shards = [i for i in range(shard[1]) if not _done_marker(out, (i, shard[1])).is_file()]
        if report.pending_shards:
            return report
    report.merged, report.n_merged = merge_answers(out, questions, bench, prompt_style)
    report.score, report.scores_file = score_answers(bench, paths, report.merged)
    return report


def _note_missing(report: EvalReport, progress: Progress | None, message: str) -> None:
    report.n_missing_images += 1
    if len(report.missing_examples) < 5:
        report.missing_examples.append(message)
        if progress is not None:
            progress.log(f"missing image: {message}")


def _generate(vlm: Any, bench: Benchmark, todo: list[Question], paths: EvalPaths, target: Path, model_id: str,
              style: str, max_new_tokens: int, batch_size: int, report: EvalReport, progress: Progress | None,
              n_absent: int) -> None:  # fmt: skip
    """Answers `todo`, appending each answer to `target` as it finishes."""
    import importlib

    from vrwkv_core.infer.sampling import GenerationConfig
    from vrwkv_core.tokenizer import default_tokenizer

    # the module (the package re-exports a function of the same name); looked up at call time
    infer = importlib.import_module("vrwkv_core.infer.generate")
    tok = default_tokenizer()
    # Greedy; the research scripts cut the decoded answer at the first "\n\n" and strip it.
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_strings=("\n\n",))
    inputs = _LazyInputs(lambda i: _build_input(vlm, tok, bench, todo[i], paths, style), len(todo), ahead=batch_size)
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
                 style: str) -> tuple[list[int], dict | None, str | None]:  # fmt: skip
    """(prompt ids, {tower: [N,3,S,S]} or None, error): an unreadable image is replaced by a
    blank one so the batch goes on; its answer is dropped and counted."""
    text = question_text(q, bench, style)
    P = vlm.tokens_per_image
    if q.image is None:
        return encode_prompt(text, tok, P, 0, style), None, None
    from vrwkv_core.infer.chat import load_image

    error = None
    try:
        image = load_image(paths.images / q.image)
    except DataError as err:
        from PIL import Image

        error, image = str(err), Image.new("RGB", (32, 32))
    views = vlm.image_processor.views(image)
    return encode_prompt(text, tok, P, len(views), style), vlm.image_processor.batch(views), error


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
    atomic_write_text(scores, json.dumps(result.to_json(), indent=1) + "\n")
    return result, scores


def merge_and_score(out: str | Path) -> EvalReport:
    """`vrwkv eval merge`: merges OUT's shard files into answers.jsonl and scores it,
    using the benchmark and data root recorded in OUT/run.json."""
    out = Path(out)
    record_path = out / RUN_FILE
    if not record_path.is_file():
        raise DataError(f"{record_path} not found: {out} is not a `vrwkv eval` output folder")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if not answer_files(out):
        raise DataError(f"{out}: no answers.jsonl or answers.shard-*-of-*.jsonl to merge")
    bench = get_benchmark(record["benchmark"])
    paths = resolve_paths(bench.name, record["data_root"])
    questions = load_questions(paths.questions)
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
    "LAYOUTS",
    "PROMPT_STYLES",
    "EvalPaths",
    "EvalReport",
    "Layout",
    "Question",
    "answer_files",
    "answer_prompt",
    "answers_path",
    "encode_prompt",
    "load_questions",
    "merge_and_score",
    "merge_answers",
    "model_id_for",
    "parse_shard",
    "prompt_suffix",
    "question_text",
    "read_answer_file",
    "resolve_paths",
    "run_eval",
    "score_answers",
    "shard_slice",
    "v6_turn_text",
]
