"""`vrwkv eval score`: answer normalisation, the official metrics, and small files in each
benchmark's official format. Expected numbers are worked out by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vrwkv_core.errors import DataError, VrwkvError
from vrwkv_core.eval import Answer, get_benchmark, read_answers, write_answers
from vrwkv_core.eval.metrics import (
    pope_metrics,
    pope_yes_no,
    scienceqa_correct,
    scienceqa_letter,
    soft_accuracy,
    textvqa_accuracy,
    vqav2_accuracy,
)
from vrwkv_core.eval.normalize import normalize_answer, process_digit_article, process_punctuation
from vrwkv_cli.eval import app

SUFFIX = "\nAnswer the question using a single word or phrase."


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_json(args: list[str]) -> dict:
    result = CliRunner().invoke(app, ["score", *args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The poster shows a 10% discount.", "poster shows 10% discount"),
        # punctuation: a mark with no space beside it becomes a space, else it is deleted
        ("red-white", "red white"),
        ("red - white", "red white"),
        ("a/b", "b"),  # "a b", then the article goes
        ("yes!", "yes"),
        ("(left)", "left"),
        # periods go unless a digit follows; decimals survive
        ("3.5", "3.5"),
        ("3.", "3"),
        (".5", ".5"),
        ("u.s.a.", "usa"),
        ("e.g. 3.14.", "eg 3.14"),
        ("." * 40, "." * 8),  # re.sub's count is re.UNICODE == 32 in both scorers
        # thousands separators: the EvalAI processor deletes every comma first
        ("1,000", "1000"),
        ("1,000,000", "1000000"),
        # articles (whole words only)
        ("the dog", "dog"),
        ("an apple", "apple"),
        ("a", ""),
        ("theater", "theater"),
        # number words up to ten; "none" is 0
        ("Two", "2"),
        ("one two three", "1 2 3"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        # contractions; capitalised keys never match after lower-casing; "'s" is split off
        ("dont", "don't"),
        ("Whats", "what's"),
        ("Im", "im"),
        ("it's", "it 's"),
        # empty and whitespace-only answers
        ("", ""),
        ("   ", ""),
        ("?", ""),
        ("\n\t", ""),
        ("red\nwhite", "red white"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1,000", "1000"),
        ("1,000-2", "10002"),  # a comma between digits deletes every mark, even the dash
        ("1-2", "1 2"),
        ("x,y-z", "x y z"),
        ("yes, sir", "yes sir"),
        ("3.5.", "3.5"),
        ("hi?!", "hi  "),  # each mark becomes a space; whitespace is collapsed later
    ],
)
def test_process_punctuation(raw: str, expected: str) -> None:
    assert process_punctuation(raw) == expected


def test_process_digit_article() -> None:
    assert process_digit_article("The  TWO  cant") == "2 can't"
    assert process_digit_article("") == ""


# ---------------------------------------------------------------- soft accuracy

@pytest.mark.parametrize(
    "n_match, expected",
    [
        (10, 1.0),
        (3, 0.9),  # 3 humans see 2 others -> 2/3; 7 see 3 -> 1: (3*2/3 + 7) / 10
        (2, 0.6),  # (2*1/3 + 8*2/3) / 10
        (1, 0.3),  # (1*0 + 9*1/3) / 10
        (0, 0.0),
    ],
)
def test_soft_accuracy_leave_one_out(n_match: int, expected: float) -> None:
    humans = ["2"] * n_match + ["3"] * (10 - n_match)
    assert soft_accuracy("2", humans) == pytest.approx(expected)


def test_vqav2_identical_humans_are_only_stripped() -> None:
    # the prediction is normalised ("Two" -> "2"); identical humans are compared as is
    assert vqav2_accuracy("Two", ["2"] * 10) == 1.0
    assert vqav2_accuracy("two", ["Two"] * 10) == 0.0
    assert vqav2_accuracy("T-shirt", ["t-shirt"] * 10) == 0.0  # pred becomes "t shirt"
    assert vqav2_accuracy("yes", [" yes\n"] * 10) == 1.0


def test_vqav2_differing_humans_are_processed() -> None:
    # humans -> ["2"]*9 + ["3"]: every leave-one-out subset keeps >= 8 matches
    assert vqav2_accuracy("two", ["Two"] * 9 + ["three"]) == 1.0
    assert vqav2_accuracy("T-shirt", ["t-shirt"] * 2 + ["shirt"] * 8) == pytest.approx(0.6)


def test_textvqa_normalises_both_sides() -> None:
    assert textvqa_accuracy("T-shirt", ["t-shirt"] * 10) == 1.0
    assert textvqa_accuracy("nokia.", ["Nokia"] * 3 + ["nokia phone"] * 7) == pytest.approx(0.9)


# ---------------------------------------------------------------- ScienceQA / POPE parsing

@pytest.mark.parametrize(
    "text, letter",
    [
        ("A", "A"),
        (" C ", "FAILED"),  # the bare letter only, as the scorer reads it (answers are stripped when made)
        ("B\n", "FAILED"),
        ("C. Because it is.", "C"),
        ("The answer is B.", "B"),
        ("So: The answer is E!", "E"),  # `The answer is X.`: any character after the letter
        ("I think The answer is E", "FAILED"),  # no character after it
        ("The answer is B The answer is C.", "FAILED"),  # two matches: exactly one is needed
        ("a", "FAILED"),
        ("(A)", "FAILED"),
        ("Answer: A", "FAILED"),
        ("A.B", "FAILED"),
        ("", "FAILED"),
        (None, "FAILED"),
    ],
)
def test_scienceqa_letter(text: str | None, letter: str) -> None:
    assert scienceqa_letter(text) == letter


def test_scienceqa_correct_checks_the_choice_range() -> None:
    assert scienceqa_correct("C", 3, 2)
    assert not scienceqa_correct("D", 3, 3)  # D is not among 3 choices
    assert not scienceqa_correct(None, 2, 0)


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("NO", "yes"),  # only "No", "no", "not" count
        ("No, there is not.", "no"),
        ("Yes. There is no dog.", "yes"),  # only the first sentence
        ("There is not a cup", "no"),
        ("no\n", "yes"),  # split on spaces only: "no\n" is not "no"
        ("", "yes"),
    ],
)
def test_pope_yes_no(text: str, parsed: str) -> None:
    assert pope_yes_no(text) == parsed


def test_pope_metrics_hand_counts() -> None:
    # TP=2 FP=1 TN=1 FN=0
    m = pope_metrics(["yes", "yes", "yes", "no"], ["yes", "yes", "no", "no"])
    assert m == pytest.approx(
        {"accuracy": 0.75, "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "yes_ratio": 0.75}
    )


# ---------------------------------------------------------------- answer files

def test_answers_roundtrip_and_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_answers(path, [Answer(1, "yes", "Q?", "m"), Answer("x", "no")])
    got = read_answers(path)
    assert [(a.question_id, a.text, a.prompt, a.model_id, a.line) for a in got] == [
        (1, "yes", "Q?", "m", 1), ("x", "no", "", "", 2)]

    path.write_text('{"question_id": 1, "text": "a"}\n\n{"question_id": 2, "text": \n')
    with pytest.raises(DataError, match=r"a\.jsonl:3: not valid JSON"):
        read_answers(path)
    path.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: 'text' missing"):
        read_answers(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"a\.jsonl:1: expected a JSON object"):
        read_answers(path)
    with pytest.raises(DataError, match="answers file not found"):
        read_answers(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- benchmarks, official formats

@pytest.fixture
def textvqa_ann(tmp_path: Path) -> Path:
    data = [
        {"question_id": 100, "image_id": "img1", "question": "what brand is this?",
         "answers": ["Nokia"] * 3 + ["nokia phone"] * 7},
        {"question_id": 101, "image_id": "img1", "question": "what number is shown?",
         "answers": ["two"] * 2 + ["3"] * 8},
        {"question_id": 102, "image_id": "img2", "question": "what color?", "answers": ["red"] * 10},
    ]
    return write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": data})


def test_textvqa_by_question_id(tmp_path: Path, textvqa_ann: Path) -> None:
    answers = write_jsonl(tmp_path / "ans.jsonl", [
        {"question_id": 100, "prompt": "", "text": "nokia.", "model_id": "m"},  # 0.9
        {"question_id": 101, "prompt": "", "text": "2", "model_id": "m"},  # 0.6
    ])
    out = cli_json(["textvqa", "--answers", str(answers), "--annotations", str(textvqa_ann)])
    assert out["accuracy"] == pytest.approx(0.75)
    assert (out["count"], out["missing"], out["duplicates"]) == (2, 1, 0)


def test_textvqa_llava_image_id_matching(tmp_path: Path, textvqa_ann: Path) -> None:
    answers = write_jsonl(tmp_path / "ans.jsonl", [
        {"question_id": "img1", "text": "Nokia",
         "prompt": "What brand is this?\nReference OCR token: NOKIA, 3310" + SUFFIX},
        {"question_id": "img1", "text": "2", "prompt": "what number is shown?" + SUFFIX},
        {"question_id": "img1", "text": "7", "prompt": "what number is shown?" + SUFFIX},  # repeat
    ])
    result = get_benchmark("textvqa").score(answers, textvqa_ann)
    assert result.accuracy == pytest.approx(0.75)
    assert (result.count, result.missing, result.duplicates) == (2, 1, 1)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": "img2", "text": "x", "prompt": "what shape?" + SUFFIX}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no question 'what shape\?' for image img2"):
        get_benchmark("textvqa").score(bad, textvqa_ann)


def test_vqav2_val(tmp_path: Path) -> None:
    def ann(qid, answers):
        return {"question_id": qid, "image_id": 9, "question_type": "what", "answer_type": "other",
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)]}
    annotations = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        ann(1, ["2"] * 10), ann(2, ["yes"] * 2 + ["no"] * 8), ann(3, ["t-shirt"] * 10), ann(4, ["red"] * 10)]})
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"question_id": q, "image_id": 9, "question": "?"} for q in (1, 2, 3)]})
    answers = write_jsonl(tmp_path / "ans.jsonl", [
        {"question_id": 1, "prompt": "", "text": "Two", "model_id": "m"},  # 1.0
        {"question_id": 2, "prompt": "", "text": "Yes", "model_id": "m"},  # 0.6
        {"question_id": 3, "prompt": "", "text": "T-shirt", "model_id": "m"},  # 0.0
    ])
    args = ["vqav2", "--answers", str(answers), "--annotations", str(annotations)]
    out = cli_json(args + ["--questions", str(questions)])
    assert out["accuracy"] == pytest.approx(1.6 / 3)
    assert out["missing"] == 0  # question 4 is outside the question file's scope
    assert cli_json(args)["missing"] == 1


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_vqav2_testdev_submission(tmp_path: Path, fmt: str) -> None:
    rows = [{"question_id": q, "image": "x.jpg", "text": "?" + SUFFIX} for q in (10, 11, 12)]
    if fmt == "jsonl":
        questions = write_jsonl(tmp_path / "llava_vqav2_mscoco_test2015.jsonl", rows)
    else:
        questions = write_json(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json", {"questions": rows})
    answers = write_jsonl(tmp_path / "merge.jsonl", [
        {"question_id": 11, "prompt": "", "text": "Yes", "model_id": "m"},
        {"question_id": 10, "prompt": "", "text": "Two dogs.", "model_id": "m"},
    ])
    out = cli_json(["vqav2-testdev", "--answers", str(answers), "--annotations", str(questions)])
    assert out["accuracy"] is None and out["missing"] == 1 and out["written"] == 3
    submitted = json.loads(Path(out["submission"]).read_text())
    assert Path(out["submission"]) == tmp_path / "merge.evalai.json"
    assert submitted == [{"question_id": 10, "answer": "2 dogs"}, {"question_id": 11, "answer": "yes"},
                         {"question_id": 12, "answer": ""}]


def test_gqa(tmp_path: Path) -> None:
    annotations = write_json(tmp_path / "testdev_balanced_questions.json", {
        "201": {"answer": "red", "isBalanced": True, "question": "?"},
        "202": {"answer": "left", "isBalanced": True, "question": "?"},
        "203": {"answer": "no", "isBalanced": False, "question": "?"},
        "204": {"answer": "yes", "isBalanced": True, "question": "?"},
    })
    answers = write_jsonl(tmp_path / "ans.jsonl", [
        {"question_id": "201", "prompt": "", "text": "Red..", "model_id": "m"},  # "red": right
        {"question_id": "202", "prompt": "", "text": "Left side", "model_id": "m"},  # wrong
        {"question_id": "203", "prompt": "", "text": "no", "model_id": "m"},  # unbalanced: not scored
    ])
    out = cli_json(["gqa", "--answers", str(answers), "--annotations", str(annotations)])
    assert out["accuracy"] == pytest.approx(0.5)
    assert (out["count"], out["missing"]) == (2, 1)


def test_scienceqa(tmp_path: Path) -> None:
    folder = tmp_path / "scienceqa"
    write_json(folder / "problems.json", {
        "1": {"question": "?", "choices": ["a", "b", "c"], "answer": 0, "image": "image.png", "split": "test"},
        "2": {"question": "?", "choices": ["a", "b"], "answer": 1, "image": None, "split": "test"},
        "3": {"question": "?", "choices": ["w", "x", "y", "z"], "answer": 2, "image": "image.png", "split": "test"},
        "4": {"question": "?", "choices": ["a", "b"], "answer": 1, "image": None, "split": "test"},
        "5": {"question": "?", "choices": ["a", "b"], "answer": 0, "image": None, "split": "val"},
    })
    write_json(folder / "pid_splits.json", {"train": [], "val": ["5"], "test": ["1", "2", "3", "4"]})
    answers = write_jsonl(tmp_path / "ans.jsonl", [
        {"question_id": "1", "prompt": "<image>\nWhich?\nA. a\nB. b\nC. c", "text": "A", "model_id": "m"},
        {"question_id": "2", "prompt": "Which?", "text": "B. b", "model_id": "m"},
        {"question_id": "3", "prompt": "<image>\nWhich?", "text": "The answer is D.", "model_id": "m"},
    ])  # "4" has no answer: failed, and not in img_accuracy (its prompt is unknown)
    out = cli_json(["scienceqa", "--answers", str(answers), "--annotations", str(folder)])
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["img_accuracy"] == pytest.approx(0.5)
    assert (out["count"], out["img_count"], out["missing"]) == (4, 2, 1)

    val = write_jsonl(tmp_path / "val.jsonl", [{"question_id": "5", "text": "A"}])
    with pytest.raises(DataError, match=r"val\.jsonl:1: question_id '5' is not in"):
        get_benchmark("scienceqa").score(val, folder)


@pytest.fixture
def pope_files(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "coco"
    labels = {
        "adversarial": [("a.jpg", "dog", "yes"), ("a.jpg", "cat", "no"), ("b.jpg", "car", "yes"), ("b.jpg", "bus", "no")],
        "random": [("c.jpg", "cup", "yes"), ("c.jpg", "fork", "no")],
    }
    questions, qid = [], 0
    for cat, rows in labels.items():
        write_jsonl(folder / f"coco_pope_{cat}.json", [
            {"question_id": i + 1, "image": img, "text": f"Is there a {obj} in the image?", "label": lab}
            for i, (img, obj, lab) in enumerate(rows)])
        for img, obj, _ in rows:
            qid += 1
            questions.append({"question_id": qid, "image": img, "text": f"Is there a {obj} in the image?" + SUFFIX,
                              "category": cat})
    return folder, write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)


def test_pope(tmp_path: Path, pope_files: tuple[Path, Path]) -> None:
    folder, questions = pope_files
    answers = write_jsonl(tmp_path / "ans.jsonl", [  # out of order on purpose
        {"question_id": 3, "prompt": "", "text": "No, there is not.", "model_id": "m"},  # no  (label yes)
        {"question_id": 1, "prompt": "", "text": "Yes, there is a dog.", "model_id": "m"},  # yes (yes)
        {"question_id": 2, "prompt": "", "text": "Yes.", "model_id": "m"},  # yes (no)
        {"question_id": 4, "prompt": "", "text": "no", "model_id": "m"},  # no  (no)
        {"question_id": 5, "prompt": "", "text": "There is not a cup", "model_id": "m"},  # no (yes)
        {"question_id": 6, "prompt": "", "text": "NO", "model_id": "m"},  # yes (no)
    ])
    out = cli_json(["pope", "--answers", str(answers), "--annotations", str(folder), "--questions", str(questions)])
    assert out["accuracy"] == pytest.approx(2 / 6)
    # adversarial: TP=FP=TN=FN=1
    assert out["adversarial"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "count": 4})
    # random: FP=FN=1: precision 0/1, recall 0/1, F1's denominator 0 -> 0
    assert out["random"] == pytest.approx(
        {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.5, "count": 2})


def test_pope_errors(tmp_path: Path, pope_files: tuple[Path, Path]) -> None:
    folder, questions = pope_files
    answers = write_jsonl(tmp_path / "ans.jsonl", [{"question_id": 1, "text": "yes"}])
    with pytest.raises(DataError, match="--questions is required"):
        get_benchmark("pope").score(answers, folder)
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    rows[0], rows[1] = rows[1], rows[0]  # no longer in the label files' order
    swapped = write_jsonl(tmp_path / "swapped.jsonl", rows)
    with pytest.raises(DataError, match=r"swapped\.jsonl:2: question does not match line 2 of coco_pope_adversarial"):
        get_benchmark("pope").score(answers, folder, swapped)


def test_shapes_and_cli_table(tmp_path: Path) -> None:
    annotations = write_json(tmp_path / "shapes" / "eval" / "answers.json", {
        "0": ["circle"], "1": ["2", "two"], "2": ["red"], "3": ["blue"]})
    answers = write_jsonl(tmp_path / "ans.jsonl", [
        {"question_id": "0", "prompt": "", "text": "A circle.", "model_id": "m"},  # right
        {"question_id": 1, "prompt": "", "text": "Two", "model_id": "m"},  # right (int id)
        {"question_id": "3", "prompt": "", "text": "green", "model_id": "m"},  # wrong
        {"question_id": "3", "prompt": "", "text": "blue", "model_id": "m"},  # repeat: ignored
    ])
    for ann in (annotations, tmp_path / "shapes"):  # the file, or the data dir holding eval/
        out = cli_json(["shapes", "--answers", str(answers), "--annotations", str(ann)])
        assert out["accuracy"] == pytest.approx(2 / 3)
        assert (out["missing"], out["duplicates"]) == (1, 1)

    result = CliRunner().invoke(app, ["score", "shapes", "--answers", str(answers), "--annotations", str(annotations)])
    assert result.exit_code == 0, result.output
    assert "66.67%" in result.output and "1 repeated answer line" in result.output


def test_shapes_scores_each_question_category(tmp_path: Path) -> None:
    annotations = write_json(tmp_path / "eval" / "answers.json", {
        "0": ["red"], "1": ["blue"], "2": ["2", "two"], "3": ["yes"], "4": ["A"]})
    write_jsonl(tmp_path / "eval" / "questions.jsonl", [
        {"question_id": str(i), "image": "x.png", "text": "q", "category": c}
        for i, c in enumerate(["color", "color", "count", "presence", "choice"])])
    answers = write_jsonl(tmp_path / "ans.jsonl", [
        {"question_id": "0", "text": "red"}, {"question_id": "1", "text": "green"},  # color 1/2
        {"question_id": "2", "text": "two"}, {"question_id": "3", "text": "no"},  # count 1/1, presence 0/1
    ])  # choice: not answered
    out = cli_json(["shapes", "--answers", str(answers), "--annotations", str(annotations)])
    assert out["accuracy"] == pytest.approx(2 / 4) and out["missing"] == 1
    assert out["count"] == 4 and out["categories"] == {
        "color": {"accuracy": 0.5, "count": 2}, "count": {"accuracy": 1.0, "count": 1},
        "presence": {"accuracy": 0.0, "count": 1}}  # choice: not answered, so not scored
    table = CliRunner().invoke(app, ["score", "shapes", "--answers", str(answers), "--annotations", str(annotations)])
    assert table.exit_code == 0, table.output
    assert "per category" in table.output and "50.00%" in table.output and "precision" not in table.output


# ---------------------------------------------------------------- errors and the CLI surface

def test_score_errors(tmp_path: Path) -> None:
    annotations = write_json(tmp_path / "answers.json", {"0": ["circle"]})
    answers = write_jsonl(tmp_path / "ans.jsonl", [
        {"question_id": "0", "text": "circle"}, {"question_id": "99", "text": "x"}, {"question_id": "98", "text": "x"}])
    with pytest.raises(DataError, match=r"ans\.jsonl:2: question_id '99' is not in .*answers\.json \(and 1 more"):
        get_benchmark("shapes").score(answers, annotations)
    with pytest.raises(DataError, match="TextVQA annotations not found"):
        get_benchmark("textvqa").score(answers, tmp_path / "missing.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no answers in"):
        get_benchmark("shapes").score(tmp_path / "empty.jsonl", annotations)
    (tmp_path / "broken.json").write_text('{"0": [')
    with pytest.raises(DataError, match=r"broken\.json:1: not valid JSON"):
        get_benchmark("shapes").score(answers, tmp_path / "broken.json")
    with pytest.raises(VrwkvError, match="unknown benchmark 'mmlu'"):
        get_benchmark("mmlu")
    assert get_benchmark("VQAv2_TestDev").name == "vqav2-testdev"


def test_registry_prompt_suffix() -> None:
    from vrwkv_core.eval.questions import Question, prompt_suffix, question_text

    sqa = get_benchmark("scienceqa")
    assert prompt_suffix(sqa, "v7") is None and prompt_suffix(sqa, "v6") is None  # as the VisualRWKV evals
    assert prompt_suffix(sqa, "llava") == "Answer with the option's letter from the given choices directly."
    gqa = get_benchmark("gqa")
    assert question_text(Question(1, "Is it red?" + SUFFIX), gqa) == "Is it red?" + SUFFIX  # already there
    assert question_text(Question(1, "What shape?"), get_benchmark("shapes")) == "What shape?"


def test_registry_postprocess() -> None:
    assert get_benchmark("gqa").postprocess("Red.") == "red"
    assert get_benchmark("scienceqa").postprocess("The answer is B.") == "B"
    assert get_benchmark("pope").postprocess("No, there is none.") == "no"
    assert get_benchmark("textvqa").postprocess("Two dogs.") == "2 dogs"


def test_generation_needs_data_root_and_help(capsys) -> None:
    from vrwkv_cli.main import run

    code = run(["eval", "--model", "m", "--benchmark", "shapes", "--out", "o"])
    assert code == 1 and "--data-root" in capsys.readouterr().err
    runner = CliRunner()
    for args in (["--help"], ["score", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Example: vrwkv eval" in result.output
