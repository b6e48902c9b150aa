"""`vrwkv eval --benchmark B` for MME, MMBench (en/cn), VizWiz, MM-Vet, ChartQA, DocVQA and
InfoVQA: question readers and LLaVA prompts, and a tiny end-to-end run per benchmark (two
shards, merge, resume, score) on synthetic files in each layout."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vrwkv_cli.main import run
from vrwkv_core.errors import DataError
from vrwkv_core.eval import get_benchmark
from vrwkv_core.eval.generate import run_eval
from vrwkv_core.eval.questions import answer_prompt, resolve_paths
from vrwkv_core.eval.readers import read_questions

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
YN = " Please answer yes or no."
MAX_NEW = 4


def _image(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), color).save(path)


def _png_b64(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 24), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# Each builder writes one benchmark's files under root/<folder> (LLaVA's layout) and returns
# (question ids in file order, the first answer's prompt, a key its --json must have).

def _mme(root: Path):
    rel = root / "MME" / "MME_Benchmark_release_version"
    _image(rel / "artwork" / "images" / "1.jpg", (200, 0, 0))
    (rel / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (rel / "artwork" / "questions_answers_YN" / "1.txt").write_text(f"Is it red?{YN}\tYes\nIs it blue?{YN}\tNo\n")
    _image(rel / "count" / "10.png", (0, 0, 200))
    (rel / "count" / "10.txt").write_text(f"Is there one square?{YN}\tYes\nAre there two squares?{YN}\tNo\n")
    qs = [("artwork/images/1.jpg", "Is it red?"), ("artwork/images/1.jpg", "Is it blue?"),
          ("count/10.png", "Is there one square?"), ("count/10.png", "Are there two squares?")]  # fmt: skip
    _jsonl(root / "MME" / "llava_mme.jsonl", [{"question_id": i, "image": i, "text": f"{t}\n{SHORT}", "category": i.split("/")[0]}
                                             for i, t in qs])  # fmt: skip
    return [i for i, _ in qs], f"<image>\nIs it red?\n{SHORT}", "perception"


def _mmbench_rows(lang_suffix: str):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]
    rows = [
        [0, "What color is it?", "nan", "red", "blue", "nan", "nan", "A", "color", _png_b64((200, 0, 0)), "perception", "dev"],
        [1000000, "What color is it?", "nan", "blue", "red", "nan", "nan", "B", "color", _png_b64((200, 0, 0)), "perception", "dev"],
        [1, "How many squares?", "Look closely.", "1", "2", "3", "", "A", "count", _png_b64((0, 0, 200)), "reasoning", "dev"],
    ]  # fmt: skip
    text = "\n".join("\t".join(map(str, r)) for r in [cols, *rows]) + "\n"
    prompt = f"<image>\nWhat color is it?\nA. red\nB. blue\n{lang_suffix}"
    return text, [0, 1000000, 1], prompt


def _mmbench(root: Path):
    text, ids, prompt = _mmbench_rows(LETTER)
    (root / "mmbench").mkdir(parents=True)
    (root / "mmbench" / "mmbench_dev_20230712.tsv").write_text(text, encoding="utf-8")
    return ids, prompt, "categories"


def _mmbench_cn(root: Path):
    text, ids, prompt = _mmbench_rows("请直接回答选项字母。")
    (root / "mmbench_cn").mkdir(parents=True)
    (root / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv").write_text(text, encoding="utf-8")
    return ids, prompt, "l2_categories"


def _vizwiz(root: Path):
    d = root / "vizwiz"
    names = [f"VizWiz_val_{i:08d}.jpg" for i in range(3)]
    for i, n in enumerate(names):
        _image(d / "val" / n, (80 * i, 100, 0))
    _json(d / "Annotations" / "val.json", [{"image": n, "question": "What is it?", "answer_type": "other", "answerable": 1,
                                            "answers": [{"answer": "box", "answer_confidence": "yes"}] * 10} for n in names])  # fmt: skip
    text = f"What is it?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT}"
    _jsonl(d / "llava_val.jsonl", [{"question_id": i, "image": n, "text": text} for i, n in enumerate(names)])
    return [0, 1, 2], f"<image>\n{text}", "answer_types"


def _mmvet(root: Path):
    d = root / "mm-vet"
    for i in range(3):
        _image(d / "images" / f"v1_{i}.png", (0, 60 * i, 90))
    _json(d / "mm-vet.json", {f"v1_{i}": {"imagename": f"v1_{i}.png", "capability": ["rec"], "question": "Q", "answer": "a"}
                              for i in range(3)})  # fmt: skip
    _jsonl(d / "llava-mm-vet.jsonl", [{"question_id": i, "image": f"v1_{i}.png", "text": "What is shown?"} for i in range(3)])
    return [0, 1, 2], "<image>\nWhat is shown?", "submission"


def _chartqa(root: Path):
    test = root / "chartqa" / "test"
    for n in ("h0.png", "h1.png", "a0.png"):
        _image(test / "png" / n, (10, 200, 10))
    _json(test / "test_human.json", [{"imgname": "h0.png", "query": "What is the peak?", "label": "12"},
                                     {"imgname": "h1.png", "query": "Which year?", "label": "2019"}])  # fmt: skip
    _json(test / "test_augmented.json", [{"imgname": "a0.png", "query": "Highest bar?", "label": "Asia"}])
    return ["human_0", "human_1", "augmented_0"], f"<image>\nWhat is the peak?\n{SHORT}", "relaxed_accuracy"


def _docvqa(root: Path):
    val = root / "docvqa" / "val"
    for i in (5, 6):
        _image(val / "documents" / f"d{i}.png", (240, 240, 240))
    _json(val / "val_v1.0.json", {"dataset_split": "val", "data": [
        {"questionId": i, "question": f"What is line {i}?", "image": f"documents/d{i}.png", "docId": i, "answers": ["x"]}
        for i in (5, 6)]})  # fmt: skip
    return [5, 6], f"<image>\nWhat is line 5?\n{SHORT}", "anls"


def _infovqa(root: Path):
    d = root / "infovqa"
    for i in (7, 8):
        _image(d / "infographicsvqa_images" / f"{i}.jpeg", (0, 0, 0))
    _json(d / "infographicsVQA_val_v1.0_withQT.json", {"data": [
        {"questionId": 65700 + i, "question": f"Share {i}?", "image_local_name": f"{i}.jpeg", "answers": ["5%"]}
        for i in (7, 8)]})  # fmt: skip
    return [65707, 65708], f"<image>\nShare 7?\n{SHORT}", "exact_match"


BUILDERS = {"mme": _mme, "mmbench": _mmbench, "mmbench-cn": _mmbench_cn, "vizwiz": _vizwiz, "mmvet": _mmvet,
            "chartqa": _chartqa, "docvqa": _docvqa, "infovqa": _infovqa}  # fmt: skip


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def trained_vlm(tiny_trained):
    from vrwkv_core.infer.loading import load_model

    return load_model(tiny_trained["finetune"], device="cpu")


def test_readers_build_llava_prompts(tmp_path):
    _mmbench(tmp_path)
    qs = read_questions("mmbench", tmp_path / "mmbench" / "mmbench_dev_20230712.tsv")
    assert [q.question_id for q in qs] == [0, 1000000, 1]
    # hint first; options up to the first empty cell ("nan" or "")
    assert qs[2].text == "Look closely.\nHow many squares?\nA. 1\nB. 2\nC. 3"
    assert Image.open(io.BytesIO(qs[2].image_data)).size == (16, 24)
    assert answer_prompt(qs[2], get_benchmark("mmbench")) == f"<image>\n{qs[2].text}\n{LETTER}"
    # v6's no-instruction rule is ScienceQA's only
    assert answer_prompt(qs[2], get_benchmark("mmbench-cn"), "v6").endswith("\n请直接回答选项字母。")
    _chartqa(tmp_path)
    cq = read_questions("chartqa", tmp_path / "chartqa" / "test" / "test_human.json")
    assert [(q.question_id, q.image) for q in cq] == [("human_0", "h0.png"), ("human_1", "h1.png"), ("augmented_0", "a0.png")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tquestion\timage\nx\tQ\taGk=\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: 'index' is not an integer"):
        read_questions("mmbench", bad)


def test_vizwiz_uses_val_when_present_else_test(tmp_path):
    d = tmp_path / "vizwiz"
    _jsonl(d / "llava_test.jsonl", [])
    (d / "test").mkdir()
    _json(d / "Annotations" / "test.json", [])
    assert resolve_paths("vizwiz", tmp_path).annotations == d / "Annotations" / "test.json"
    _vizwiz(tmp_path)
    paths = resolve_paths("vizwiz", tmp_path)
    assert (paths.annotations, paths.score_questions) == (d / "Annotations" / "val.json", d / "llava_val.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("bench", list(BUILDERS))
def test_generate_shard_resume_score(bench, trained_vlm, tmp_path):
    ids, first_prompt, key = BUILDERS[bench](tmp_path / "eval")
    out = tmp_path / "run"
    kw = {"batch_size": 2, "max_new_tokens": MAX_NEW, "prompt_style": "v7"}
    one = run_eval(trained_vlm, bench, tmp_path / "eval", out, shard=(1, 2), **kw)
    assert one.merged is None and one.pending_shards == [0] and one.n_answered == len(ids) // 2
    zero = run_eval(trained_vlm, bench, tmp_path / "eval", out, shard=(0, 2), **kw)
    answers = _lines(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == ids  # merged in question order
    assert answers[0]["prompt"] == first_prompt
    scores = json.loads((out / "scores.json").read_text())
    assert scores == zero.score.to_json() and scores["benchmark"] == bench and key in scores
    assert (scores["count"], scores["missing"]) == (len(ids), 0)
    again = run_eval(trained_vlm, bench, tmp_path / "eval", out, **kw)  # resume: nothing left to answer
    assert (again.n_answered, again.n_skipped) == (0, len(ids))
    assert again.score.to_json() == scores


@pytest.mark.slow
def test_cli_eval_mmbench_cn_end_to_end(tiny_trained, tmp_path, capsys):
    ids, _, _ = _mmbench_cn(tmp_path)
    out = tmp_path / "run"
    code = run(["eval", "--model", str(tiny_trained["finetune"]), "--benchmark", "mmbench-cn", "--data-root",
                str(tmp_path), "--out", str(out), "--device", "cpu", "--max-new-tokens", str(MAX_NEW), "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    scores = json.loads(captured.out.strip().splitlines()[-1])
    assert scores["groups"] == 2 and set(scores["categories"]) == {"color", "count"}
    assert [a["question_id"] for a in _lines(out / "answers.jsonl")] == ids
