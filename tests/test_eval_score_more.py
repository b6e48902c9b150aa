"""`vrwkv eval score` for MME, MMBench (en/cn), VizWiz, MM-Vet, ChartQA, DocVQA and InfoVQA:
hand-made answer files and annotations in each official format, expected figures worked
out by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vrwkv_cli.eval import app
from vrwkv_core.errors import DataError
from vrwkv_core.eval import get_benchmark
from vrwkv_core.eval.docqa import anls, exact_match, relaxed_correct
from vrwkv_core.eval.mmbench import can_infer
from vrwkv_core.eval.mme import mme_yes_no

SHORT = "Answer the question using a single word or phrase."
YN = " Please answer yes or no."


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_answers(path: Path, rows) -> Path:
    """rows: (question_id, text[, prompt])."""
    lines = [{"question_id": r[0], "prompt": r[2] if len(r) > 2 else "", "text": r[1], "model_id": "m"} for r in rows]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return path


def score(args: list[str], json_output: bool = True) -> dict:
    result = CliRunner().invoke(app, ["score", *args, *(["--json"] if json_output else [])])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout.strip().splitlines()[-1]) if json_output else {"table": result.stdout}


# ---------------------------------------------------------------- MME

@pytest.mark.parametrize("text, parsed", [
    ("yes", "yes"), ("No", "no"), ("Nope", "no"), ("None of them", "no"), ("Eyes are open", "yes"),
    ("The answer is yes", "other"), ("Not sure", "no"), ("YES.", "yes"), ("maybe", "other"),
])  # fmt: skip
def test_mme_yes_no_parsing(text, parsed):
    assert mme_yes_no(text) == parsed


def _mme_release(root: Path) -> Path:
    rel = root / "MME_Benchmark_release_version"
    qa = rel / "artwork" / "questions_answers_YN"
    qa.mkdir(parents=True)
    (rel / "artwork" / "images").mkdir()
    (qa / "1.txt").write_text(f"Is this by Monet?{YN}\tYes\nIs this by Dali?{YN}\tNo\n")
    (qa / "2.txt").write_text(f"Is it oil?{YN}\tYes\nIs it a sculpture?{YN}\tNo\n")
    (qa / "3.txt").write_text(f"Is it old?{YN}\tYes\nIs it new?{YN}\tNo\n")  # never answered
    (rel / "count").mkdir()
    # the release has a few questions written with two spaces before "Please"
    (rel / "count" / "10.txt").write_text(f"Are there two dogs?{YN}\tYes\nAre there three dogs? {YN}\tNo\n")
    (rel / "code_reasoning").mkdir()
    (rel / "code_reasoning" / "0020.txt").write_text(f"Does it print 3?{YN}\tYes\nDoes it print 4?{YN}\tNo\n")
    return rel


def _mme_prompt(question: str) -> str:
    return f"<image>\n{question}\n{SHORT}"


def test_mme_scores_per_subtask_with_image_pairs(tmp_path):
    rel = _mme_release(tmp_path)
    rows = [
        ("artwork/images/1.jpg", "Yes", _mme_prompt("Is this by Monet?")),       # yes == yes
        ("artwork/images/1.jpg", "Nope", _mme_prompt("Is this by Dali?")),       # no == no   -> image right
        ("artwork/images/1.jpg", "No", _mme_prompt("Is this by Monet?")),        # repeat: ignored
        ("artwork/images/2.jpg", "Eyes see oil", _mme_prompt("Is it oil?")),     # yes == yes
        ("artwork/images/2.jpg", "The answer is no", _mme_prompt("Is it a sculpture?")),  # other -> image wrong
        ("count/10.jpg", "yes", _mme_prompt("Are there two dogs?")),             # right
        ("count/10.jpg", "None", _mme_prompt("Are there three dogs?")),          # two-space question; no == no
        ("code_reasoning/0020.png", "No", _mme_prompt("Does it print 3?")),      # wrong
        ("code_reasoning/0020.png", "no", _mme_prompt("Does it print 4?")),      # right
    ]  # fmt: skip
    answers = write_answers(tmp_path / "a.jsonl", rows)
    got = score(["mme", "--answers", str(answers), "--annotations", str(rel)])
    # artwork: acc 3/4, acc+ 1/2 (image 3 unanswered: not counted) -> 75 + 50
    # count: 2/2, 1/1 -> 200; code_reasoning: 1/2, 0/1 -> 50
    assert got["subtasks"] == {
        "artwork": {"acc": 0.75, "acc_plus": 0.5, "score": 125.0},
        "code_reasoning": {"acc": 0.5, "acc_plus": 0.0, "score": 50.0},
        "count": {"acc": 1.0, "acc_plus": 1.0, "score": 200.0},
    }
    assert (got["perception"], got["cognition"], got["total"]) == (325.0, 50.0, 375.0)
    assert got["accuracy"] == 6 / 8
    assert (got["count"], got["missing"], got["duplicates"]) == (8, 2, 1)
    assert "perception" in score(["mme", "--answers", str(answers), "--annotations", str(rel)], False)["table"]


def test_mme_unknown_question_is_an_error(tmp_path):
    rel = _mme_release(tmp_path)
    answers = write_answers(tmp_path / "a.jsonl", [("artwork/images/1.jpg", "yes", _mme_prompt("Is this by Turner?"))])
    with pytest.raises(DataError, match=r"a\.jsonl:1: question_id 'artwork/images/1\.jpg' is not in"):
        get_benchmark("mme").score(answers, rel)


# ---------------------------------------------------------------- MMBench

CHOICES = {"A": "blue", "B": "red", "C": "green", "D": "yellow"}


@pytest.mark.parametrize("answer, letter", [
    ("A", "A"), ("(B) red", "B"), ("The answer is C.", "C"), ("[D]", "D"),
    ("A or B", None),                              # two letters
    ("Cannot determine the answer. A", "Z"),       # a refusal string wins
    ("I'm sorry, but without the image provided I can't", "Z"),
    ("Z", "Z"),                                    # no option letter, a Z token
    ("It is blue", "A"),                           # one option text inside the answer
    ("blue or red", None),                         # two option texts
    ("B。", None), ("选项B", None), ("b", None),    # no token, no text
    ("Failed to obtain answer via API: A", None),  # skips the letter rules; no option text inside
])  # fmt: skip
def test_mmbench_can_infer(answer, letter):
    assert can_infer(answer, dict(CHOICES)) == letter


MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]  # fmt: skip


def mmbench_tsv(path: Path, rows: list[dict]) -> Path:
    """rows: dicts of the columns above; absent cells are written as pandas' "nan"."""
    lines = ["\t".join(MMB_COLUMNS)]
    for r in rows:
        lines.append("\t".join(str(r.get(c, "nan")) for c in MMB_COLUMNS))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mmb(index, options, answer, category, l2, question="Q?", hint="nan"):
    return {"index": index, "question": question, "hint": hint, **dict(zip("ABCD", options)), "answer": answer,
            "category": category, "l2-category": l2, "image": "aGk=", "split": "dev"}  # fmt: skip


def test_mmbench_circular_groups_and_categories(tmp_path):
    tsv = mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv", [
        _mmb(0, ["blue", "red", "green", "yellow"], "A", "color", "perception"),
        _mmb(1000000, ["red", "green", "yellow", "blue"], "D", "color", "perception"),
        _mmb(2000000, ["green", "yellow", "blue", "red"], "C", "color", "perception"),
        _mmb(1, ["1", "2", "3"], "B", "count", "perception", hint="A photo of a room."),
        _mmb(1000001, ["2", "3", "1"], "A", "count", "perception"),
        _mmb(2, ["apple", "car"], "A", "object", "reasoning"),
        _mmb(1000002, ["car", "apple"], "B", "object", "reasoning"),
        _mmb(3, ["yes", "no"], "B", "color", "reasoning"),
        _mmb(1000003, ["no", "yes"], "A", "color", "reasoning"),
        _mmb(4, ["x", "y"], "A", "object", "reasoning"),
        _mmb(1000004, ["y", "x"], "B", "object", "reasoning"),
        _mmb(5, ["cat", "dog"], "A", "object", "reasoning"),
    ])  # fmt: skip
    answers = write_answers(tmp_path / "a.jsonl", [
        (0, "A"), (1000000, "The answer is D."), (2000000, "blue"),     # group 0: right (free text read as C)
        (1, "(B) 2"), (1000001, "Cannot determine the answer, maybe A"),  # group 1: a refusal -> Z: wrong
        (2, "apple"), (1000002, "B"), (2, "car"),                      # group 2: right; the repeat is ignored
        (3, "B"), (1000003, "B"),                                      # group 3: the circular variant is wrong
        (4, "A"),                                                      # group 4: 1000004 unanswered -> wrong
        (5, "a"),                                                      # group 5: lower-case letter: none
    ])  # fmt: skip
    got = score(["mmbench", "--answers", str(answers), "--annotations", str(tsv)])
    assert got["accuracy"] == 2 / 6 and got["groups"] == 6
    assert got["categories"] == {"color": 1 / 2, "count": 0.0, "object": 1 / 3}  # groups 0,3 | 1 | 2,4,5
    assert got["l2_categories"] == {"perception": 1 / 2, "reasoning": 1 / 4}  # 0,1 | 2,3,4,5
    assert (got["count"], got["missing"], got["duplicates"]) == (11, 1, 1)
    assert "l2_categories" in score(["mmbench", "--answers", str(answers), "--annotations", str(tsv)], False)["table"]
    # the CN scorer is the same; an unknown index is an error
    assert score(["mmbench-cn", "--answers", str(answers), "--annotations", str(tsv)])["accuracy"] == 2 / 6
    bad = write_answers(tmp_path / "b.jsonl", [(7, "A")])
    with pytest.raises(DataError, match=r"b\.jsonl:1: question_id 7 is not in"):
        get_benchmark("mmbench").score(bad, tsv)


# ---------------------------------------------------------------- VizWiz

def _vizwiz_val(root: Path) -> tuple[Path, Path]:
    def entry(i, answers, kind):
        return {"image": f"VizWiz_val_{i:08d}.jpg", "question": "What is this?", "answer_type": kind,
                "answerable": int(kind != "unanswerable"),
                "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}  # fmt: skip

    ann = write_json(root / "Annotations" / "val.json", [
        entry(0, ["unanswerable"] * 10, "unanswerable"),
        entry(1, ["coffee", "coffee", "mug", "cup", "cup", "cup", "cup", "tea", "tea", "coffee cup"], "other"),
        entry(2, ["2"] * 3 + ["two"] * 3 + ["3"] * 4, "number"),
        entry(3, ["yes"] * 10, "yes/no"),
        entry(4, ["no"] * 10, "yes/no"),
    ])  # fmt: skip
    questions = root / "llava_val.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": f"VizWiz_val_{i:08d}.jpg",
                                             "text": f"What is this?\n{SHORT}"}) + "\n" for i in range(5)))  # fmt: skip
    return ann, questions


def test_vizwiz_val_accuracy_and_answer_types(tmp_path):
    ann, questions = _vizwiz_val(tmp_path)
    answers = write_answers(tmp_path / "a.jsonl", [(0, "Unanswerable."), (1, "Coffee"), (2, "Two"), (3, "no")])
    got = score(["vizwiz", "--answers", str(answers), "--annotations", str(ann), "--questions", str(questions)])
    # 0: all 10 say unanswerable -> 1.  1: "coffee" matches 2 humans: the 2 coffee annotators
    # see 1 match among the others (1/3), the other 8 see 2 (2/3): (2/3 + 16/3) / 10 = 0.6.
    # 2: the prediction becomes "2"; the humans' "two" are compared as stored, so 3 match:
    # (3 * 2/3 + 7 * 1) / 10 = 0.9.  3: 0.  4: unanswered.
    assert got["accuracy"] == pytest.approx((1 + 0.6 + 0.9 + 0) / 4, abs=1e-12)
    assert got["answer_types"] == pytest.approx({"yes/no": 0.0, "number": 0.9, "other": 0.6, "unanswerable": 1.0})
    assert (got["count"], got["missing"]) == (4, 1)
    # without --questions the question_id is the image name
    by_name = write_answers(tmp_path / "b.jsonl", [("VizWiz_val_00000001.jpg", "Coffee")])
    assert score(["vizwiz", "--answers", str(by_name), "--annotations", str(ann)])["accuracy"] == pytest.approx(0.6)
    with pytest.raises(DataError, match=r"b\.jsonl:1: question_id 'VizWiz_val_00000001\.jpg' is not in"):
        get_benchmark("vizwiz").score(by_name, ann, questions)  # with it, ids are the file's


def test_vizwiz_test_writes_the_evalai_upload(tmp_path):
    ann = write_json(tmp_path / "Annotations" / "test.json",
                     [{"image": f"VizWiz_test_{i:08d}.jpg", "question": "What?"} for i in range(3)])  # fmt: skip
    answers = write_answers(tmp_path / "a.jsonl", [("VizWiz_test_00000002.jpg", "Two dogs."), ("VizWiz_test_00000000.jpg", "Unanswerable")])
    got = score(["vizwiz", "--answers", str(answers), "--annotations", str(ann)])
    upload = tmp_path / "a.evalai.json"
    assert got["accuracy"] is None and got["submission"] == str(upload) and got["written"] == 3
    assert json.loads(upload.read_text()) == [{"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
                                              {"image": "VizWiz_test_00000001.jpg", "answer": ""},
                                              {"image": "VizWiz_test_00000002.jpg", "answer": "2 dogs"}]  # fmt: skip


# ---------------------------------------------------------------- MM-Vet

def test_mmvet_writes_the_grader_input(tmp_path):
    ann = write_json(tmp_path / "mm-vet" / "mm-vet.json",
                     {f"v1_{i}": {"imagename": f"v1_{i}.png", "capability": ["rec"], "question": "Q?", "answer": "x"}
                      for i in range(3)})  # fmt: skip
    answers = write_answers(tmp_path / "a.jsonl", [(0, "A cat\n sits. 猫"), (2, "42"), (0, "again")])
    got = score(["mmvet", "--answers", str(answers), "--annotations", str(ann)])
    out = tmp_path / "a.mmvet.json"
    assert got["accuracy"] is None and (got["count"], got["missing"], got["duplicates"], got["written"]) == (2, 1, 1, 2)
    assert json.loads(out.read_text()) == {"v1_0": "A cat\n sits. 猫", "v1_2": "42"}  # verbatim, first answer
    custom = tmp_path / "results.json"
    assert score(["mmvet", "--answers", str(answers), "--annotations", str(ann), "--submission", str(custom)])["submission"] == str(custom)
    with pytest.raises(DataError, match="question_id 5"):
        get_benchmark("mmvet").score(write_answers(tmp_path / "b.jsonl", [(5, "x")]), ann)


# ---------------------------------------------------------------- ChartQA

@pytest.mark.parametrize("pred, target, right", [
    ("105", "100", True), ("95", "100", True),      # exactly 5% away: right
    ("105.5", "100", False), ("19", "20", True),    # 1/20 == 0.05
    ("0.12", "12%", True), ("12", "12%", False),    # "12%" reads as 0.12
    ("0.01", "0", False), ("0", "0", True),         # a zero target: string comparison
    ("Yes", "yes", True), ("Paris.", "Paris", False),
])  # fmt: skip
def test_chartqa_relaxed_correctness(pred, target, right):
    assert relaxed_correct(pred, target) is right


def test_chartqa_relaxed_accuracy_per_split(tmp_path):
    test = tmp_path / "ChartQA Dataset" / "test"
    write_json(test / "test_human.json", [{"imgname": f"h{i}.png", "query": "Q?", "label": lab}
                                          for i, lab in enumerate(["100", "100", "12%", "Yes", "0"])])  # fmt: skip
    write_json(test / "test_augmented.json", [{"imgname": f"a{i}.png", "query": "Q?", "label": lab}
                                              for i, lab in enumerate(["20", "Paris", "3.5", "7"])])  # fmt: skip
    answers = write_answers(tmp_path / "a.jsonl", [
        ("human_0", "105"), ("human_1", "105.5"), ("human_2", "0.12"), ("human_3", "yes"), ("human_4", "0.01"),
        ("augmented_0", "19"), ("augmented_1", "Paris."), ("augmented_2", "3.5"),
    ])  # fmt: skip
    got = score(["chartqa", "--answers", str(answers), "--annotations", str(test)])
    # human: right 0, 2, 3 -> 3/5; augmented: right 0, 2 -> 2/3; all: 5/8
    assert (got["relaxed_human"], got["relaxed_augmented"], got["relaxed_accuracy"]) == (3 / 5, 2 / 3, 5 / 8)
    assert got["accuracy"] == 5 / 8
    assert got["exact_match"] == 3 / 8  # "yes"=="Yes", "Paris."->"paris", "3.5"
    assert (got["count"], got["missing"]) == (8, 1)


# ---------------------------------------------------------------- DocVQA / InfoVQA

def test_anls_and_exact_match_rules():
    assert anls("ax", ["ab"]) == 0.5  # distance 1 / length 2: exactly 0.5 is kept
    assert anls("axy", ["abc"]) == 0.0  # 1 - 2/3 < 0.5
    assert anls("  hello   WORLD ", ["Hello World", "hi"]) == 1.0
    assert anls("  abxd  ", ["abcd"]) == 1 - 1 / 8  # distance of the normalised strings / raw length 8
    assert anls("", [""]) == 1.0
    assert exact_match("Hello World.", ["hello world"]) and not exact_match("hello   world", ["hello world"])


def test_docvqa_anls(tmp_path):
    def q(i, answers):
        return {"questionId": i, "question": "Q?", "image": f"documents/d{i}.png", "docId": i, "answers": answers}

    ann = write_json(tmp_path / "val" / "val_v1.0.json", {"dataset_split": "val", "data": [
        q(1, ["ab"]), q(2, ["abc"]), q(3, ["Hello World", "hi"]), q(4, ["Hello World"]), q(5, ["abcd"]), q(6, ["x"])]})  # fmt: skip
    answers = write_answers(tmp_path / "a.jsonl", [(1, "ax"), (2, "axy"), (3, "  hello   WORLD "), (4, "Hello World."),
                                                    (5, "  abxd  ")])  # fmt: skip
    got = score(["docvqa", "--answers", str(answers), "--annotations", str(ann)])
    # 0.5, 0, 1, 1 - 1/12 ("hello world." is 1 edit from "hello world", raw length 12), 1 - 1/8
    assert got["anls"] == got["accuracy"] == pytest.approx((0.5 + 0 + 1 + 11 / 12 + 7 / 8) / 5, abs=1e-12)
    assert got["exact_match"] == 1 / 5  # only "Hello World."
    assert (got["count"], got["missing"]) == (5, 1)


def test_infovqa_anls(tmp_path):
    ann = write_json(tmp_path / "infographicsVQA_val_v1.0_withQT.json", {"data": [
        {"questionId": 65718, "question": "Q?", "image_local_name": "1.jpeg", "answers": ["12", "twelve"]},
        {"questionId": 65719, "question": "Q?", "image_local_name": "2.jpeg", "answers": ["ab"]}]})  # fmt: skip
    answers = write_answers(tmp_path / "a.jsonl", [(65718, "Twelve"), (65719, "ax")])
    got = score(["infovqa", "--answers", str(answers), "--annotations", str(ann)])
    assert (got["anls"], got["exact_match"]) == ((1 + 0.5) / 2, 1 / 2)
    no_answers = write_json(tmp_path / "test.json", {"data": [{"questionId": 1, "question": "Q?"}]})
    with pytest.raises(DataError, match=r"data\[0\]: 'answers' must be a non-empty list"):
        get_benchmark("infovqa").score(answers, no_answers)
