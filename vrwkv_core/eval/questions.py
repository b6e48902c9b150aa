"""Benchmark questions: where each benchmark's files are, reading its question file, building prompts.

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
    mme            MME       llava_mme.jsonl                             MME_Benchmark_release_version/ (images and answers)
    mmbench        mmbench   mmbench_dev_20230712.tsv (images inside)    -             the same TSV
    mmbench-cn     mmbench_cn mmbench_dev_cn_20231003.tsv                -             the same TSV
    vizwiz         vizwiz    llava_val.jsonl                             val/          Annotations/val.json
                             (else) llava_test.jsonl                     test/         Annotations/test.json (EvalAI upload)
    mmvet          mm-vet    llava-mm-vet.jsonl                          images/       mm-vet.json (grader input)
    chartqa        chartqa   test/test_human.json + test_augmented.json  test/png/     test/
    docvqa         docvqa    val/val_v1.0.json                           val/          val/val_v1.0.json
    infovqa        infovqa   infographicsVQA_val_v1.0_withQT.json        infographicsvqa_images/ (the same JSON)

Question files: LLaVA JSONL (`question_id`, `image`, `text`, optional `category`; the
text already ends with the benchmark's instruction), ScienceQA's JSON list (`id`,
optional `image`, `conversations[0].value`; the letter instruction is appended here, as
LLaVA's `--single-pred-prompt` does), or the official VQAv2 `{"questions": [...]}` file
(images `COCO_val2014_{image_id:012d}.jpg`); the release files of MMBench (a TSV with
base64 images), ChartQA and DocVQA/InfoVQA are read by `readers.py`. An instruction already at the end of a
question is never added twice. Questions without an image (ScienceQA text-only) are
answered from text alone.

Prompt styles: `v7` puts the image markers first (`User: <image>\\n{q}\\n\\nAssistant:`);
`v6` is VisualRWKV v6.0's "middle" prompt, `User: {q without the short-answer line}\\n<image>\\n{q}\\n\\nAssistant:`,
and, like v6.0's own eval, adds no letter instruction to ScienceQA.
MMBench's prompt is LLaVA's: hint, question, `A. option` lines, then the letter instruction
(MMBench-CN: `请直接回答选项字母。`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vrwkv_core.data.conversation import (
    IMAGE_MARKER,
    collapse_blank_lines,
    encode_generation_prompt,
    normalize_turn_text,
)
from vrwkv_core.errors import DataError, VrwkvError
from vrwkv_core.eval.benchmarks import Benchmark, get_benchmark, read_json, read_jsonl

if TYPE_CHECKING:
    from vrwkv_core.tokenizer import RWKVTokenizer

PROMPT_STYLES = ("v7", "v6", "llava")


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


LAYOUTS: dict[str, Layout | tuple[Layout, ...]] = {
    "textvqa": Layout("textvqa", "llava_textvqa_val_v051_ocr.jsonl", "train_images", "TextVQA_0.5.1_val.json"),
    "vqav2": Layout("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json", "val2014",
                    "v2_mscoco_val2014_annotations.json", score_with_questions=True),
    "vqav2-testdev": Layout("vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015",
                            "llava_vqav2_mscoco_test2015.jsonl"),
    "gqa": Layout("gqa", "llava_gqa_testdev_balanced.jsonl", "data/images", "data/testdev_balanced_questions.json"),
    "scienceqa": Layout("scienceqa", "llava_test_CQM-A.json", "images/test", "."),
    "pope": Layout("pope", "llava_pope_test.jsonl", "val2014", "coco", score_with_questions=True),
    "shapes": Layout("shapes", "eval/questions.jsonl", "images", "eval/answers.json"),
    "mme": Layout("MME", "llava_mme.jsonl", "MME_Benchmark_release_version", "MME_Benchmark_release_version"),
    "mmbench": Layout("mmbench", "mmbench_dev_20230712.tsv", ".", "mmbench_dev_20230712.tsv"),
    "mmbench-cn": Layout("mmbench_cn", "mmbench_dev_cn_20231003.tsv", ".", "mmbench_dev_cn_20231003.tsv"),
    # val when its question file is there (scored), else test (scoring writes the EvalAI upload)
    "vizwiz": (Layout("vizwiz", "llava_val.jsonl", "val", "Annotations/val.json", score_with_questions=True),
               Layout("vizwiz", "llava_test.jsonl", "test", "Annotations/test.json", score_with_questions=True)),
    "mmvet": Layout("mm-vet", "llava-mm-vet.jsonl", "images", "mm-vet.json"),
    "chartqa": Layout("chartqa", "test/test_human.json", "test/png", "test"),
    "docvqa": Layout("docvqa", "val/val_v1.0.json", "val", "val/val_v1.0.json"),
    "infovqa": Layout("infovqa", "infographicsVQA_val_v1.0_withQT.json", "infographicsvqa_images",
                      "infographicsVQA_val_v1.0_withQT.json"),
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
    layouts = LAYOUTS[name] if isinstance(LAYOUTS[name], tuple) else (LAYOUTS[name],)
    given = Path(data_root).expanduser()
    found = next(((r, lay) for lay in layouts for r in (given, given / lay.folder) if (r / lay.questions).is_file()), None)
    if found is None:
        layout = layouts[0]
        raise DataError(
            f"{name}: question file not found: {given / layout.questions}",
            hint=f"--data-root is the {name} folder holding {layout.questions}, {layout.images}/ and "
                 f"{layout.annotations} (LLaVA: playground/data/eval/{layout.folder})",
        )  # fmt: skip
    root, layout = found
    paths = EvalPaths(root, root / layout.questions, root / layout.images, (root / layout.annotations),
                      root / layout.questions if layout.score_with_questions else None)  # fmt: skip
    if not paths.images.is_dir():
        raise DataError(f"{name}: image folder not found: {paths.images}")
    if not paths.annotations.exists():
        raise DataError(f"{name}: annotations not found: {paths.annotations}",
                        hint="answers are scored against it; `vrwkv eval score` scores an answer file later")  # fmt: skip
    return paths


@dataclass(frozen=True)
class Question:
    """One benchmark question."""

    question_id: int | str
    text: str
    """As written in the question file, `<image>` markers removed."""
    image: str | None = None
    """Path relative to the image folder; None for a text-only question."""
    category: str | None = None
    image_data: bytes | None = None
    """The encoded image itself, for files that embed their images (MMBench's TSV)."""


def load_questions(path: str | Path) -> list[Question]:
    """Questions of a LLaVA JSONL file, a ScienceQA-style JSON list, or the official VQAv2 JSON."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [_llava_question(obj, f"{path}:{n}") for n, obj in read_jsonl(path, "question file")]
    data = read_json(path, "question file")
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        split = str(data.get("data_subtype", "val2014"))
        return [_vqav2_question(q, split, f"{path}: questions[{i}]") for i, q in enumerate(data["questions"])]
    if isinstance(data, list):
        return [_llava_question(q, f"{path}: [{i}]") for i, q in enumerate(data)]
    raise DataError(f"{path}: expected JSON lines, a JSON list, or an object with a 'questions' list")


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


def prompt_suffix(bench: Benchmark, style: str) -> str | None:
    """The instruction appended to each question: the VisualRWKV originals' (none for ScienceQA),
    or with style `llava` LLaVA-1.5's (ScienceQA's letter instruction)."""
    if style == "llava" and bench.llava_suffix:
        return bench.llava_suffix
    return bench.prompt_suffix


def answers_text_only(bench: Benchmark, style: str) -> bool:
    """Whether questions without an image are answered: v7.00's eval skips them, v6.0's answers
    them after a blank image's zero rows (`Family.blank_image_rows`), as `llava` answers them."""
    return style in ("llava", "v6") or not bench.skip_text_only


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
    value = "\n".join([IMAGE_MARKER] * n_images + [question.replace(IMAGE_MARKER, "")])
    return f"User: {normalize_turn_text('human', value, 'middle')}\n\n"


def prompt_image_position(style: str) -> str:
    """The image position of a prompt style (v7, llava: first; v6: middle)."""
    if style not in PROMPT_STYLES:
        raise VrwkvError(f"unknown prompt style {style!r}", hint="use v7, v6 or llava")
    return "middle" if style == "v6" else "first"


def encode_prompt(question: str, tokenizer: RWKVTokenizer, tokens_per_image: int, n_images: int = 1,
                  style: str = "v7") -> list[int]:  # fmt: skip
    """Prompt ids ending with `Assistant:` in the given style."""
    return encode_generation_prompt(question, tokenizer, tokens_per_image, n_images, prompt_image_position(style))


__all__ = [
    "LAYOUTS",
    "PROMPT_STYLES",
    "answers_text_only",
    "EvalPaths",
    "Layout",
    "Question",
    "answer_prompt",
    "encode_prompt",
    "load_questions",
    "prompt_image_position",
    "prompt_suffix",
    "question_text",
    "resolve_paths",
    "v6_turn_text",
]
