"""`vrwkv eval`: question loading per LLaVA format, prompts, resume, shards + merge, missing images, batching."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import build_tiny_vlm

from vrwkv_cli.main import run
from vrwkv_core.errors import DataError, VrwkvError
from vrwkv_core.eval.benchmarks import OPTION_LETTER, SHORT_ANSWER, get_benchmark
from vrwkv_core.eval.generate import merge_answers, parse_shard, read_answer_file, run_eval, shard_slice
from vrwkv_core.eval.questions import (
    Question,
    answer_prompt,
    encode_prompt,
    load_questions,
    question_text,
    resolve_paths,
    v6_turn_text,
)

REPO = Path(__file__).resolve().parents[1]
N_EVAL = 8
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained tiny VisualRWKV (tiny recipe, non-degenerate random LM weights), saved as
    one of our model dirs, plus a small shapes folder. Returns (model, model dir, shapes dir)."""
    from vrwkv_core.checkpoint import save_pretrained
    from vrwkv_core.config import load_recipe
    from vrwkv_core.data.shapes import prepare_shapes

    root = tmp_path_factory.mktemp("eval_gen")
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    vlm = build_tiny_vlm(seed=0, model=recipe.model)
    save_pretrained(vlm, root / "model", recipe)
    shapes = prepare_shapes(root / "shapes", n_train=1, n_eval=N_EVAL, seed=0)
    return vlm, root / "model", shapes


@pytest.fixture
def cli_model(tiny, monkeypatch):
    """`vrwkv eval --model <dir>` gets the already-built model (building one takes seconds)."""
    vlm, model_dir, _ = tiny
    loads = []

    def fake_load(spec, device="auto", dtype="auto", **options):  # the loading options are not this test's subject
        loads.append(str(spec))
        return vlm

    monkeypatch.setattr("vrwkv_core.eval.generate.load_model", fake_load)
    return model_dir, loads


@pytest.fixture
def count_prompts(monkeypatch):
    """Records how many prompts each generate_many call receives."""
    module = importlib.import_module("vrwkv_core.infer.generate")
    original = module.generate_many
    calls: list[int] = []

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        yield from original(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(module, "generate_many", counting)
    return calls


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- questions and prompts

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_question_loading_for_each_llava_format(tmp_path):
    # TextVQA: LLaVA's file puts the image id in question_id (two questions on one image)
    tvqa = _write(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", "\n".join(json.dumps(r) for r in [
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
         "text": f"what is the brand of this camera?\nReference OCR token: dakota, digital\n{SHORT_ANSWER}"},
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": f"what does the small white text spell?\n{SHORT_ANSWER}"},
    ]) + "\n\n")  # fmt: skip
    qs = load_questions(tvqa)
    assert [q.question_id for q in qs] == ["003a8ae2ef43b901"] * 2
    assert qs[0].image == "003a8ae2ef43b901.jpg" and qs[0].text.endswith(SHORT_ANSWER)
    # the file already holds the instruction: it is not added twice
    assert question_text(qs[0], get_benchmark("textvqa")) == qs[0].text
    assert answer_prompt(qs[1], get_benchmark("textvqa")) == "<image>\n" + qs[1].text

    # POPE / GQA: JSONL with categories, int and str ids
    pope = _write(tmp_path / "llava_pope_test.jsonl",
                  json.dumps({"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                              "text": f"Is there a snowboard in the image?\n{SHORT_ANSWER}", "category": "adversarial"}) + "\n")  # fmt: skip
    (q,) = load_questions(pope)
    assert (q.question_id, q.category) == (1, "adversarial")

    # ScienceQA: a JSON list with conversations; "<image>" sits at the end of LLaVA's text
    sqa = _write(tmp_path / "llava_test_CQM-A.json", json.dumps([
        {"id": "4", "image": "4/image.png", "conversations": [
            {"from": "human", "value": "Context: N/A\nWhich state is farthest north?\nA. Ohio\nB. Utah\n<image>"},
            {"from": "gpt", "value": "A"}]},
        {"id": "7", "conversations": [{"from": "human", "value": "Which word is a noun?\nA. run\nB. cat"}]},
    ]))  # fmt: skip
    with_image, text_only = load_questions(sqa)
    bench = get_benchmark("scienceqa")
    assert with_image == Question("4", "Context: N/A\nWhich state is farthest north?\nA. Ohio\nB. Utah", "4/image.png")
    assert text_only.image is None
    # the v7.00 eval: `<image>\n` + the question as in the file, no letter instruction (v6.0's: none either)
    assert question_text(with_image, bench) == question_text(with_image, bench, "v6") == with_image.text
    assert answer_prompt(with_image, bench) == "<image>\n" + with_image.text
    # style llava: LLaVA-1.5's single-prediction prompt
    assert question_text(with_image, bench, "llava") == with_image.text + "\n" + OPTION_LETTER
    assert answer_prompt(text_only, bench, "llava") == text_only.text + "\n" + OPTION_LETTER  # no <image>: not in img_accuracy
    done = Question("9", "Pick one.\nA. x\nB. y\n" + OPTION_LETTER)
    assert question_text(done, bench, "llava") == done.text

    # VQAv2 val: the official question file; the short-answer instruction is appended
    vqa = _write(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", json.dumps(
        {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "What color is the bus?", "question_id": 42000}]}))  # fmt: skip
    (v,) = load_questions(vqa)
    assert v == Question(42000, "What color is the bus?", "COCO_val2014_000000000042.jpg")
    assert question_text(v, get_benchmark("vqav2")) == f"What color is the bus?\n{SHORT_ANSWER}"


def test_bad_question_files_name_the_line(tmp_path):
    bad = _write(tmp_path / "q.jsonl", json.dumps({"question_id": 1, "text": "ok"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"q\.jsonl:2: not valid JSON"):
        load_questions(bad)
    no_id = _write(tmp_path / "r.jsonl", json.dumps({"text": "no id"}) + "\n")
    with pytest.raises(DataError, match=r"r\.jsonl:1: no question id"):
        load_questions(no_id)
    no_text = _write(tmp_path / "s.json", json.dumps([{"id": "1", "conversations": []}]))
    with pytest.raises(DataError, match=r"s\.json: \[0\]: no question"):
        load_questions(no_text)


def test_eval_tree_is_found_from_the_folder_or_its_parent(tmp_path):
    pope = tmp_path / "eval" / "pope"
    _write(pope / "llava_pope_test.jsonl", "")
    (pope / "val2014").mkdir()
    with pytest.raises(DataError, match=r"annotations not found: .*pope[/\\]coco"):
        resolve_paths("pope", pope)
    (pope / "coco").mkdir()
    from_parent, from_folder = resolve_paths("pope", tmp_path / "eval"), resolve_paths("pope", pope)
    assert from_parent == from_folder
    assert from_folder.images == pope / "val2014" and from_folder.score_questions == pope / "llava_pope_test.jsonl"
    with pytest.raises(DataError, match="llava_gqa_testdev_balanced.jsonl") as err:
        resolve_paths("gqa", tmp_path / "eval")
    assert "playground/data/eval/gqa" in (err.value.hint or "")


def test_v6_prompt_puts_the_image_in_the_middle(tokenizer):
    q = f"Is there a dog in the image?\n{SHORT_ANSWER}"
    assert v6_turn_text(q) == f"User: Is there a dog in the image?\n<image>\n{q}\n\n"
    assert v6_turn_text("Describe it.", n_images=2) == "User: Describe it.\n<image>\n<image>\nDescribe it.\n\n"
    P = 4
    ids = encode_prompt(q, tokenizer, P, 1, "v6")
    expected = (tokenizer.encode("User: Is there a dog in the image?\n") + [65535] * P
                + tokenizer.encode(f"\n{q}\n\n") + tokenizer.encode("Assistant:"))  # fmt: skip
    assert ids == expected
    v7 = encode_prompt(q, tokenizer, P, 1, "v7")
    assert v7 == tokenizer.encode("User: ") + [65535] * P + tokenizer.encode(f"\n{q}\n\n") + tokenizer.encode("Assistant:")
    assert encode_prompt("Hi?", tokenizer, P, 0, "v6") == encode_prompt("Hi?", tokenizer, P, 0, "v7")
    with pytest.raises(VrwkvError, match="prompt style"):
        encode_prompt(q, tokenizer, P, 1, "v5")


def test_shard_parsing_and_slices():
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(VrwkvError, match="--shard"):
            parse_shard(bad)
    items = list(range(10))
    parts = [shard_slice(items, (i, 3)) for i in range(3)]
    assert parts[0] == [0, 3, 6, 9] and sorted(sum(parts, [])) == items


def test_truncated_last_line_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = [json.dumps({"question_id": i, "prompt": "p", "text": f"a{i}", "model_id": "m"}) for i in range(2)]
    path.write_text("\n".join(good) + "\n" + good[0][:17], encoding="utf-8")
    assert [a.text for a in read_answer_file(path)] == ["a0", "a1"]
    assert path.read_text(encoding="utf-8").endswith(good[0][:17])  # a reader that does not own it leaves it
    assert len(read_answer_file(path, repair=True)) == 2
    assert path.read_text(encoding="utf-8") == "\n".join(good) + "\n"
    # a complete last line without its newline is kept, and the newline added
    path.write_text(good[0] + "\n" + good[1], encoding="utf-8")
    assert len(read_answer_file(path, repair=True)) == 2 and path.read_text(encoding="utf-8").endswith("}\n")
    path.write_text(good[0] + "\n{oops\n" + good[1] + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"answers\.jsonl:2"):
        read_answer_file(path)


def test_merge_keeps_questions_that_share_an_image_id(tmp_path):
    bench = get_benchmark("textvqa")
    qs = [Question("img1", f"what is written?\n{SHORT_ANSWER}", "img1.jpg"),
          Question("img1", f"what color is it?\n{SHORT_ANSWER}", "img1.jpg")]  # fmt: skip
    rows = [{"question_id": "img1", "prompt": answer_prompt(q, bench), "text": t, "model_id": "m"}
            for q, t in zip(reversed(qs), ("red", "stop"))]  # fmt: skip
    _write(tmp_path / "answers.shard-1-of-2.jsonl", json.dumps(rows[0]) + "\n")
    _write(tmp_path / "answers.shard-0-of-2.jsonl", json.dumps(rows[1]) + "\n")
    path, n = merge_answers(tmp_path, qs, bench, "v7")
    assert n == 2 and [a["text"] for a in _lines(path)] == ["stop", "red"]  # question order


# ---------------------------------------------------------------- generation runs

def test_resume_skips_answered_ids(tiny, tmp_path, count_prompts):
    vlm, _, shapes = tiny
    out = tmp_path / "run"
    first = run_eval(vlm, "shapes", shapes, out, limit=5, batch_size=2, max_new_tokens=MAX_NEW)
    assert (first.n_answered, first.n_skipped) == (5, 0) and count_prompts == [5]
    before = _lines(out / "answers.jsonl")
    # a crash while writing the 5th answer: its line is cut short
    text = (out / "answers.jsonl").read_text(encoding="utf-8")
    (out / "answers.jsonl").write_text(text[: text.rstrip("\n").rfind("\n") + 1] + '{"question_id": "sha', encoding="utf-8")
    second = run_eval(vlm, "shapes", shapes, out, limit=7, batch_size=2, max_new_tokens=MAX_NEW)
    assert count_prompts == [5, 3]  # the cut answer + 2 new questions; the 4 saved ones are skipped
    assert (second.n_answered, second.n_skipped, second.n_questions) == (3, 4, 7)
    after = _lines(out / "answers.jsonl")
    assert [a["question_id"] for a in after] == [f"shapes-{i:05d}" for i in range(7)]
    assert after[:5] == before  # the regenerated answer is the same (greedy)
    third = run_eval(vlm, "shapes", shapes, out, limit=7, max_new_tokens=MAX_NEW)
    assert third.n_answered == 0 and count_prompts == [5, 3]  # nothing left: the model is not even run
    assert third.score is not None and third.score.count == 7
    with pytest.raises(VrwkvError, match="prompt_style"):
        run_eval(vlm, "shapes", shapes, out, limit=7, prompt_style="v6", max_new_tokens=MAX_NEW)


def test_batch_1_and_batch_4_give_identical_answers(tiny, tmp_path):
    vlm, _, shapes = tiny
    # 6 questions in batches of 4: samples finish at different steps and queued ones join
    one = run_eval(vlm, "shapes", shapes, tmp_path / "b1", limit=6, batch_size=1, max_new_tokens=MAX_NEW)
    four = run_eval(vlm, "shapes", shapes, tmp_path / "b4", limit=6, batch_size=4, max_new_tokens=MAX_NEW)
    assert one.n_answered == four.n_answered == 6
    texts = [a["text"] for a in _lines(one.merged)]
    assert len(set(texts)) > 1  # the answers depend on the question and image
    assert one.merged.read_bytes() == four.merged.read_bytes()


def test_shards_then_merge_equal_an_unsharded_run(tiny, cli_model, tmp_path, capsys):
    vlm, _, shapes = tiny
    model_dir, loads = cli_model
    whole = run_eval(str(model_dir), "shapes", shapes, tmp_path / "whole", batch_size=3, max_new_tokens=MAX_NEW)
    out = tmp_path / "sharded"
    base = ["eval", "--model", str(model_dir), "--benchmark", "shapes", "--data-root", str(shapes), "--out", str(out),
            "--max-new-tokens", str(MAX_NEW), "--batch-size", "2", "--json"]  # fmt: skip
    assert run(base + ["--shard", "1/2"]) == 0
    status = _last_json(capsys.readouterr().out)
    assert status == {"benchmark": "shapes", "shard": "1/2", "merged": False, "answered": N_EVAL // 2,
                      "skipped": 0, "missing_images": 0, "pending_shards": [0]}  # fmt: skip
    assert [a["question_id"] for a in _lines(out / "answers.shard-1-of-2.jsonl")] == [f"shapes-{i:05d}" for i in range(1, N_EVAL, 2)]
    assert not (out / "answers.jsonl").exists()
    assert run(base + ["--shard", "0/2"]) == 0  # the last shard to finish merges and scores
    scores = _last_json(capsys.readouterr().out)
    assert (out / "answers.jsonl").read_bytes() == whole.merged.read_bytes()
    assert scores == json.loads((out / "scores.json").read_text()) == whole.score.to_json()
    assert len(loads) == 3
    (out / "answers.jsonl").unlink()
    assert run(["eval", "merge", "--out", str(out), "--json"]) == 0
    assert (out / "answers.jsonl").read_bytes() == whole.merged.read_bytes()
    assert _last_json(capsys.readouterr().out) == scores


def test_missing_image_is_counted_not_fatal(tiny, cli_model, tmp_path, capsys):
    shapes = tiny[2]
    data = tmp_path / "shapes"
    shutil.copytree(shapes, data)
    (data / "images" / "eval_00002.png").unlink()
    (data / "images" / "eval_00005.png").write_bytes(b"not a png")
    model_dir, _ = cli_model
    out = tmp_path / "run"
    code = run(["eval", "--model", str(model_dir), "--benchmark", "shapes", "--data-root", str(data), "--out", str(out),
                "--max-new-tokens", str(MAX_NEW), "--batch-size", "4", "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    ids = [a["question_id"] for a in _lines(out / "answers.jsonl")]
    assert ids == [f"shapes-{i:05d}" for i in range(N_EVAL) if i not in (2, 5)]
    scores = _last_json(captured.out)
    assert (scores["count"], scores["missing"]) == (N_EVAL - 2, 2)
    err = "".join(captured.err.split())  # Rich wraps long paths
    assert "eval_00002.png:imagefilenotfound(questionshapes-00002)" in err
    assert "eval_00005.png:notanimagefile" in err and "2question(s)skippedforamissingorunreadableimage" in err
    assert "missingimages│2" in err  # the summary row (on stderr with --json)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run(["eval", "--benchmark", "shapes", "--out", str(tmp_path)]) == 1
    assert "needs --model, --data-root" in capsys.readouterr().err
    assert run(["eval", "--model", "m", "--benchmark", "nocaps", "--data-root", str(tmp_path), "--out", str(tmp_path)]) == 1
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.mark.slow
def test_shapes_end_to_end_on_the_trained_tiny_model(tiny_trained, tmp_path, capsys):
    data, model = tiny_trained["data"], tiny_trained["finetune"]
    out = tmp_path / "shapes_eval"
    code = run(["eval", "--model", str(model), "--benchmark", "shapes", "--data-root", str(data), "--out", str(out),
                "--device", "cpu", "--batch-size", "8", "--max-new-tokens", "8", "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    scores = _last_json(captured.out)
    questions = [json.loads(line) for line in (data / "eval" / "questions.jsonl").read_text().splitlines()]
    answers = _lines(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for a, q in zip(answers, questions):
        assert set(a) == {"question_id", "prompt", "text", "model_id"}
        assert a["prompt"] == "<image>\n" + q["text"] and a["model_id"].endswith("finetune")
    assert json.loads((out / "scores.json").read_text()) == scores
    assert scores["count"] == len(questions) and 0.0 <= scores["accuracy"] <= 1.0
    assert run(["eval", "score", "shapes", "--answers", str(out / "answers.jsonl"),
                "--annotations", str(data / "eval" / "answers.json"), "--json"]) == 0  # fmt: skip
    assert _last_json(capsys.readouterr().out)["accuracy"] == scores["accuracy"]


def test_original_eval_settings_for_scienceqa_and_the_v7_pad(tiny, tmp_path):
    """The v7.00 eval answers image questions only (ScienceQA text-only ones are skipped, so they
    fail in `accuracy` and stay out of `img_accuracy`; style llava answers them) and pads each
    prompt with token 261 to a multiple of 16."""
    from vrwkv_core.data.conversation import left_pad
    from vrwkv_core.eval.generate import _build_input
    from vrwkv_core.eval.questions import EvalPaths, answers_text_only
    from vrwkv_core.tokenizer import default_tokenizer

    sqa, shapes = get_benchmark("scienceqa"), get_benchmark("shapes")
    assert not answers_text_only(sqa, "v7") and answers_text_only(sqa, "v6") and answers_text_only(sqa, "llava")
    assert answers_text_only(shapes, "v7")
    assert left_pad(20, 16) == [261] * 12 and left_pad(32, 16) == [] and left_pad(5, 0) == []
    vlm, _, data = tiny
    q = Question("q1", "How many shapes are there?", "eval_00000.png")
    paths = EvalPaths(data, data / "eval" / "questions.jsonl", data / "images", data / "eval" / "answers.json", None)
    tok = default_tokenizer()
    plain, _, _ = _build_input(vlm, tok, shapes, q, paths, "v7", pad=0)
    padded, _, _ = _build_input(vlm, tok, shapes, q, paths, "v7", pad=16)
    assert padded == [261] * ((-len(plain)) % 16) + plain and len(padded) % 16 == 0


def test_eval_prompt_style_defaults_to_the_models(v6_dir: Path, tiny_v6, tmp_path: Path) -> None:
    """`vrwkv eval` without --prompt-style uses v6 for an x060 model (dir or loaded), else v7."""
    from helpers import build_tiny_vlm

    from vrwkv_core.eval.generate import default_prompt_style

    assert default_prompt_style(v6_dir) == "v6" and default_prompt_style(str(v6_dir)) == "v6"
    assert default_prompt_style(tiny_v6) == "v6"
    assert default_prompt_style(tmp_path / "model.pth") is None  # a file: only its tensors tell
    assert default_prompt_style(build_tiny_vlm()) == "v7"
