"""VQAv2 test-dev: `vrwkv eval` writes the EvalAI upload file as LLaVA's
scripts/convert_vqav2_for_submission.py does, and says where it is and that the answers are not public."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vrwkv_cli.main import run
from vrwkv_core.eval import get_benchmark

SA = "Answer the question using a single word or phrase."


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_upload_has_every_test2015_id_in_order_with_evalai_answers(tmp_path: Path) -> None:
    """Hand-worked: the EvalAI processor lower-cases, drops `,` `?` and articles, splits `'s`,
    writes number words as digits; unanswered ids (here 7, a test-std one) get ""."""
    test2015 = _jsonl(tmp_path / "llava_vqav2_mscoco_test2015.jsonl",
                      [{"question_id": q, "image": "x.jpg", "text": "?"} for q in (9, 7, 3)])  # fmt: skip
    answers = _jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 3, "prompt": "", "text": "The Man's hat, Two?", "model_id": "m"},
        {"question_id": 9, "prompt": "", "text": "Yes\n", "model_id": "m"},
    ])  # fmt: skip
    result = get_benchmark("vqav2-testdev").score(answers, test2015)
    upload = tmp_path / "answers.evalai.json"
    assert result.details["submission"] == str(upload) and result.accuracy is None
    assert upload.read_text() == ('[{"question_id": 9, "answer": "yes"}, {"question_id": 7, "answer": ""}, '
                                  '{"question_id": 3, "answer": "man \'s hat 2"}]')  # json.dump's layout, as LLaVA
    assert "not public" in result.details["note"] and str(upload) in result.details["note"]
    assert "1 of the 3 test2015 ids" in result.details["note"]


@pytest.mark.slow
def test_cli_eval_vqav2_testdev_writes_the_upload_and_says_so(tiny_trained, tmp_path: Path, capsys) -> None:
    root = tmp_path / "eval" / "vqav2"
    for name in ("a.png", "b.png"):
        (root / "test2015").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 16), (200, 30, 30)).save(root / "test2015" / name)
    _jsonl(root / "llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": 11, "image": "a.png", "text": f"What color?\n{SA}"},
        {"question_id": 12, "image": "b.png", "text": f"How many shapes?\n{SA}"},
    ])  # fmt: skip
    _jsonl(root / "llava_vqav2_mscoco_test2015.jsonl",
           [{"question_id": q, "image": "a.png", "text": "?"} for q in (10, 11, 12, 13)])  # fmt: skip
    out = tmp_path / "run"
    code = run(["eval", "--model", str(tiny_trained["finetune"]), "--benchmark", "vqav2-testdev", "--data-root",
                str(tmp_path / "eval"), "--out", str(out), "--device", "cpu", "--max-new-tokens", "3"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    upload = json.loads((out / "answers.evalai.json").read_text())
    assert [r["question_id"] for r in upload] == [10, 11, 12, 13]
    assert upload[0]["answer"] == upload[3]["answer"] == ""  # test-std ids: not asked, submitted empty
    note = next(line for line in captured.out.splitlines() if line.startswith("note: VQAv2 test-dev answers are not public"))
    assert f"upload {out / 'answers.evalai.json'} (2 answered, 2 of the 4 test2015 ids" in note
