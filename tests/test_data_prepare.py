"""`prepare-data llava`: exactly the planted faults are rejected; the real sample passes."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from typer.testing import CliRunner

from vrwkv_cli.prepare_data import app
from vrwkv_core.data import sources
from vrwkv_core.data.conversation import encode_conversation_info
from vrwkv_core.data.prepare import prepare_llava
from vrwkv_core.data.sources import iter_records
from vrwkv_core.errors import DataError

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "llava-textvqa-sample"
if not SAMPLE.is_dir():
    SAMPLE = Path("/work/shared/testdata/llava-textvqa-sample")
REAL_JPG = next((SAMPLE / "images").rglob("*.jpg"), None) if SAMPLE.is_dir() else None


def conv(q: str = "<image>\nWhat is it?", a: str = "A thing.") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, list[dict], dict[int, str]]:
    """An image folder and 14 records; returns (folder, records, {bad index: reason})."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "ok.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(images / "sub" / "ok2.jpg")
    good_jpg = (images / "sub" / "ok2.jpg").read_bytes()
    (images / "corrupt.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    (images / "text.jpg").write_text("this is not an image\n")
    Image.new("RGB", (3, 3)).save(images / "tiny.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "outside.png")
    (images / "link_out.png").symlink_to(tmp_path / "outside.png")
    (images / "link_in.png").symlink_to(images / "ok.png")
    records = [
        {"id": "good-str", "image": "ok.png", "conversations": conv()},
        {"id": "good-two", "image": ["ok.png", "sub/ok2.jpg"], "conversations": conv("<image>\n<image>\nCompare.")},
        {"id": "good-text", "conversations": conv("Hello?", "Hi.")},
        {"id": "missing", "image": "nope.png", "conversations": conv()},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": conv()},
        {"id": "text-as-image", "image": "text.jpg", "conversations": conv()},
        {"id": "escape", "image": "../outside.png", "conversations": conv()},
        {"id": "absolute", "image": str(images / "ok.png"), "conversations": conv()},
        {"id": "markers", "image": "ok.png", "conversations": conv("<image>\n<image>\nTwo?")},
        {"id": "roles", "image": "ok.png", "conversations": [{"from": "gpt", "value": "<image>\nx"}, {"from": "human", "value": "y"}]},
        {"id": "empty", "image": "ok.png", "conversations": conv(a="  ")},
        {"id": "symlink-out", "image": "link_out.png", "conversations": conv()},
        {"id": "tiny", "image": "tiny.png", "conversations": conv()},
        {"id": "good-marker-last", "image": ["link_in.png"], "conversations": conv("What is it?\n\n\n<image>")},
    ]
    bad = {
        3: "missing image",
        4: "image does not decode",
        5: "image does not decode",
        6: "image path escapes the image folder",
        7: "absolute image path",
        8: "marker count != image count",
        9: "bad roles",
        10: "empty turn",
        11: "image path escapes the image folder",
        12: "image too small",
    }
    return images, records, bad


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_planted_faults_are_rejected_exactly(tmp_path, planted, fmt):
    images, records, bad = planted
    src = tmp_path / f"data.{fmt}"
    if fmt == "json":
        src.write_text(json.dumps(records, indent=1))
    else:
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="10 of 14 records rejected"):
        prepare_llava(src, images, out, max_reject_fraction=0.5)

    # the report is complete even though the run failed
    rejects = read_jsonl(out / "rejects.jsonl")
    assert {r["index"]: r["reason"] for r in rejects} == bad
    assert all(r["id"] == records[r["index"]]["id"] for r in rejects)
    if fmt == "jsonl":
        assert [r["line"] for r in rejects] == [i + 1 for i in sorted(bad)]
    good = read_jsonl(out / "data.jsonl")
    assert [r["id"] for r in good] == ["good-str", "good-two", "good-text", "good-marker-last"]
    assert good[0]["image"] == ["ok.png"] and good[2]["image"] == []
    assert good[3]["conversations"][0]["value"] == "<image>\nWhat is it?"
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["records"], stats["accepted"], stats["rejected"], stats["images"]) == (14, 4, 10, 4)
    assert stats["reject_reasons"]["image does not decode"] == 2
    assert sum(stats["reject_reasons"].values()) == 10
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # within the allowed fraction it succeeds and writes the same data
    report = prepare_llava(src, images, tmp_path / "out2", max_reject_fraction=0.75)
    assert report.accepted == 4 and (tmp_path / "out2" / "data.jsonl").read_text() == (out / "data.jsonl").read_text()


def test_invalid_jsonl_line_is_a_reject(tmp_path, planted):
    images, records, _ = planted
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(records[0]) + "\n{not json\n\n" + json.dumps(records[2]) + "\n")
    report = prepare_llava(src, images, tmp_path / "out", max_reject_fraction=0.5)
    assert (report.records, report.accepted) == (3, 2)
    (rej,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert (rej["index"], rej["line"], rej["reason"]) == (1, 2, "invalid json")


@pytest.mark.skipif(REAL_JPG is None, reason="shared testdata not present")
def test_real_sample_is_accepted_with_token_stats(tmp_path):
    out = tmp_path / "out"
    report = prepare_llava(SAMPLE / "data.json", SAMPLE / "images", out, tokens_per_image=16, ctx_len=128)
    assert (report.records, report.accepted, report.rejected) == (1000, 1000, 0)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["length_unit"] == "tokens" and stats["images"] == 1000
    # lengths are the template's token counts
    from vrwkv_core.tokenizer import RWKVTokenizer

    tok = RWKVTokenizer()
    records = json.loads((SAMPLE / "data.json").read_text())
    lengths = sorted(encode_conversation_info(r["conversations"], tok, 16).n_tokens_full for r in records)
    assert (stats["lengths"]["min"], stats["lengths"]["max"]) == (lengths[0], lengths[-1])
    assert stats["over_ctx_len"] == sum(n > 128 for n in lengths) > 0
    first = records[0]
    assert read_jsonl(out / "data.jsonl")[0]["id"] == first["id"]


@pytest.mark.skipif(REAL_JPG is None, reason="shared testdata not present")
def test_two_workers_and_shuffle_match_one_worker(tmp_path):
    records = json.loads((SAMPLE / "data.json").read_text())[:300]
    records[5]["image"] = "missing.jpg"
    src = tmp_path / "d.json"
    src.write_text(json.dumps(records))
    one = prepare_llava(src, SAMPLE / "images", tmp_path / "w1", workers=1)
    two = prepare_llava(src, SAMPLE / "images", tmp_path / "w2", workers=2)
    assert one.accepted == two.accepted == 299
    for name in ("data.jsonl", "rejects.jsonl"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    prepare_llava(src, SAMPLE / "images", tmp_path / "s1", shuffle_seed=3)
    prepare_llava(src, SAMPLE / "images", tmp_path / "s2", shuffle_seed=3)
    ordered = (tmp_path / "w1" / "data.jsonl").read_text().splitlines()
    shuffled = (tmp_path / "s1" / "data.jsonl").read_text().splitlines()
    assert shuffled != ordered and sorted(shuffled) == sorted(ordered)
    assert (tmp_path / "s2" / "data.jsonl").read_text().splitlines() == shuffled
    assert not list((tmp_path / "s1").glob(".*"))  # no temp files left behind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers inherit the patch on Linux only")
def test_a_dead_worker_fails_the_run_instead_of_hanging(tmp_path, planted, monkeypatch):
    from vrwkv_core.data import prepare

    images, records, _ = planted
    src = tmp_path / "d.json"
    src.write_text(json.dumps(records[:3]))
    monkeypatch.setattr(prepare, "_check_chunk_with", lambda checker, chunk: os._exit(3))
    with pytest.raises(DataError, match="worker process died"):
        prepare_llava(src, images, tmp_path / "out", workers=2)
    assert not (tmp_path / "out" / "data.jsonl").exists()  # nothing half-written


def test_streaming_array_parser_matches_json_load(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_BLOCK", 7)  # force records and numbers across block edges
    data = [{"id": i, "v": "é\n" * (i % 5), "n": [1.5e3, -12345, None, True]} for i in range(40)] + [123456789, "x"]
    src = tmp_path / "a.json"
    src.write_text("\n  [\n" + ",\n".join(json.dumps(d, ensure_ascii=False) for d in data) + "\n]\n", encoding="utf-8")
    items = list(iter_records(src))
    assert [it.record for it in items] == data
    assert [it.line for it in items[:3]] == [3, 4, 5]
    src.write_text('[{"a": 1},\n{"a": 2} {"a": 3}]')
    with pytest.raises(DataError, match=r"a\.json:2: malformed JSON array"):
        list(iter_records(src))
    src.write_text('[{"a": 1}, {"a": ')
    with pytest.raises(DataError, match="malformed"):
        list(iter_records(src))
    src.write_text("[]")
    assert list(iter_records(src)) == []


def test_bad_arguments(tmp_path, planted):
    images, records, _ = planted
    src = tmp_path / "d.json"
    src.write_text(json.dumps(records[:1]))
    with pytest.raises(DataError, match="needs --tokens-per-image"):
        prepare_llava(src, images, tmp_path / "o", ctx_len=100)
    with pytest.raises(DataError, match="image folder does not exist"):
        prepare_llava(src, tmp_path / "nope", tmp_path / "o")
    (tmp_path / "empty.json").write_text("  ")
    with pytest.raises(DataError, match="empty"):
        prepare_llava(tmp_path / "empty.json", images, tmp_path / "o")
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_cli_prints_summary_and_fails_over_the_fraction(tmp_path, planted):
    images, records, _ = planted
    src = tmp_path / "d.json"
    src.write_text(json.dumps(records))
    args = ["llava", "--json", str(src), "--image-folder", str(images), "--out", str(tmp_path / "o"), "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, DataError) and "10 of 14 records rejected" in str(result.exception)
    assert "missing image" in result.output  # the summary table came first
    result = CliRunner().invoke(app, args + ["--max-reject-fraction", "0.8", "--tokens-per-image", "8", "--ctx-len", "64"])
    assert result.exit_code == 0, result.output
    assert "accepted" in result.output and "over ctx_len 64" in result.output
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert all(cmd in help_text for cmd in ("llava", "extract", "synthetic-shapes"))
