"""`vrwkv chat` end to end on a tiny model dir: --prompt, --json, scripted interactive use, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import build_tiny_vlm
from PIL import Image

from vrwkv_cli.main import run
from vrwkv_core.eval.benchmarks import SHORT_ANSWER

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny output dir as a training stage writes it: config.yaml + model.safetensors."""
    from vrwkv_core.checkpoint import save_pretrained
    from vrwkv_core.config import load_recipe

    out = tmp_path_factory.mktemp("model")
    vlm = build_tiny_vlm()
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    save_pretrained(vlm, out, replace(recipe, model=vlm.config, data=replace(recipe.data, ctx_len=30)))
    Image.new("RGB", (40, 30), "red").save(out / "red.png")
    Image.new("RGB", (30, 30), "blue").save(out / "blue.png")
    (out / "notes.txt").write_text("not an image")
    return out


def _chat(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", "from vrwkv_cli.main import main; main()", "chat", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=300, cwd=cwd,
    )


def test_prompt_answers_once_with_only_the_answer_on_stdout(model_dir: Path, capsys):
    from vrwkv_core.infer import ChatSession, load_model

    args = ["--model", str(model_dir), "--image", str(model_dir / "red.png"), "--device", "cpu",
            "--max-new-tokens", "6", "--prompt", "What color is the square?"]  # fmt: skip
    proc = _chat(*args, "--json")  # the real console script in a fresh process
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"answer", "ttft_s", "tokens_per_s", "n_new_tokens", "finish_reason", "load_s"} <= set(record)
    # the same answer in-process, from the same directory
    session = ChatSession(load_model(model_dir, device="cpu"))
    session.add_image(model_dir / "red.png")
    expected = session.ask("What color is the square?", max_new_tokens=6).run()
    assert record["answer"] == expected.text and record["n_new_tokens"] == len(expected.token_ids)
    capsys.readouterr()
    assert run(["chat", *args, "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"
    assert "tokens" in err and "first token" in err


def test_interactive_session_through_scripted_stdin(model_dir: Path, tmp_path: Path):
    script = "\n".join([
        "/help",
        "What color \\",  # a continued line
        "is it?",
        "/reset",
        "What color \\",
        "is it?",
        "",  # empty prompt: a message, the session goes on
        f"/image {tmp_path / 'missing.png'}",
        f"/image {model_dir / 'notes.txt'}",
        f"/image {model_dir / 'blue.png'}",
        "And this one?",
        f"/save {tmp_path / 'conv.safetensors'}",
        "/retry",
        f"/load {tmp_path / 'conv.safetensors'}",
        "/frobnicate",
        "/quit",
        "never asked",
    ]) + "\n"  # fmt: skip
    proc = _chat("--model", str(model_dir), "--image", str(model_dir / "red.png"), "--device", "cpu",
                 "--max-new-tokens", "5", "--stats", stdin=script)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out, err = proc.stdout, proc.stderr
    assert "/image PATH" in out and "Ctrl-C" in out  # the help
    answers = re.findall(r"assistant> (.*)", out)
    assert len(answers) == 4  # two questions about red, one about blue, one retry
    assert answers[0] == answers[1]  # after /reset the same image and question: the same answer
    assert answers[2] == answers[3]  # greedy retry
    assert "empty prompt" in out
    assert "missing.png: image file not found" in err and "not an image" in err
    assert "new conversation (1 image(s) kept)" in out
    assert (tmp_path / "conv.safetensors").is_file() and (tmp_path / "conv.json").is_file()
    assert "loaded" in out and "2 turn(s)" not in out and "4 turn(s)" in out
    assert "unknown command /frobnicate" in out
    assert "tokens/s" in out
    assert "warning:" in err and "longer than the 30" in err  # past the config's data.ctx_len
    assert "never asked" not in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "{d}/missing.png", "--prompt", "hi"], "missing.png: image file not found"),
        (["--image", "{d}/notes.txt", "--prompt", "hi"], "not an image"),
        (["--prompt", "   "], "empty prompt"),
        (["--json"], "--json needs --prompt"),
    ],
)
def test_one_shot_bad_inputs_are_one_line_errors(model_dir: Path, capsys, extra, message):
    code = run(["chat", "--model", str(model_dir), *[a.format(d=model_dir) for a in extra]])
    err = capsys.readouterr().err
    assert code == 1 and "error: " in err and message in err
    assert "Traceback" not in err


def test_missing_model_and_absent_registry_name(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert run(["chat", "--model", str(tmp_path / "no-such-dir"), "--prompt", "hi"]) == 1
    assert "no-such-dir" in capsys.readouterr().err
    assert run(["chat", "--model", "visualrwkv-v0700-0b1", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "vrwkv download visualrwkv-v0700-0b1" in err
    (tmp_path / "empty").mkdir()
    assert run(["chat", "--model", str(tmp_path / "empty"), "--prompt", "hi"]) == 1
    assert "config.yaml" in capsys.readouterr().err


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(model_dir: Path, monkeypatch):
    from rich.console import Console

    from vrwkv_cli import chat as chat_cli
    from vrwkv_core.infer import ChatSession, GenerationConfig, load_model

    vlm = load_model(model_dir, device="cpu")
    session = ChatSession(vlm, config=GenerationConfig(max_new_tokens=6, stop_tokens=()))
    session.add_image(model_dir / "red.png")
    lines = iter(["Tell me more.", "", "Again?"])
    steps = {"n": 0}
    forward = vlm.rwkv.forward

    def flaky_forward(*args, **kwargs):  # Ctrl-C arrives during the third decode step
        steps["n"] += 1
        if steps["n"] == 4:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(vlm.rwkv, "forward", flaky_forward)
    console = Console(record=True, width=200)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(console, "input", fake_input)
    chat_cli._interactive(session, console, Console(record=True), stats=False)
    text = console.export_text()
    assert "[stopped]" in text
    assert [t["role"] for t in session.turns] == ["user", "assistant"] * 2
    first = session.turns[1]["text"]
    assert text.count("assistant>") == 2 and first and first in text
    # the interrupted answer kept the tokens the state had seen; the next turn continued from there
    assert session.last_result is not None and session.last_result.finish_reason == "length"


def test_load_model_is_the_checkpoint_loader_plus_the_cpu_decoding_layout(model_dir: Path, tmp_path: Path):
    import shutil

    import torch
    import yaml

    from vrwkv_core.checkpoint import load_visual_rwkv, read_recipe, save_pretrained
    from vrwkv_core.errors import CheckpointError
    from vrwkv_core.infer.loading import load_model

    fast, plain = load_model(model_dir, device="cpu"), load_visual_rwkv(model_dir, device="cpu")
    a, b = fast.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = fast.rwkv.head.weight
    assert head.t().is_contiguous() and not head.is_contiguous(), "column-major matrices for decoding"
    assert plain.rwkv.head.weight.is_contiguous()
    ids = torch.tensor([[11, 22, 33, 44]])
    with torch.no_grad():
        torch.testing.assert_close(fast.rwkv(ids)[0], plain.rwkv(ids)[0], rtol=1e-5, atol=1e-5)
    # the optimized model still saves and loads back bit-exactly
    save_pretrained(fast, tmp_path / "again", read_recipe(model_dir))
    c = load_visual_rwkv(tmp_path / "again", device="cpu").state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["model"]["rwkv"]["n_layer"] += 1  # a layer the weights do not have
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(bad, device="cpu")


def test_chat_cli_prompt_answers_with_a_tiny_v6_dir(v6_dir: Path, tokenizer, capsys) -> None:
    """`vrwkv chat --prompt` on a saved x060 / middle model dir answers on CPU, as ChatSession does."""
    import json

    from vrwkv_cli.main import run
    from vrwkv_core.infer import ChatSession, load_model

    q = f"What color is the square?\n{SHORT_ANSWER}"
    args = ["chat", "--model", str(v6_dir), "--image", str(v6_dir / "red.png"), "--device", "cpu",
            "--max-new-tokens", "5", "--prompt", q, "--json"]  # fmt: skip
    capsys.readouterr()
    assert run(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    vlm = load_model(v6_dir, device="cpu")
    assert (vlm.config.rwkv.version, vlm.config.image_position) == ("x060", "middle")
    session = ChatSession(vlm, tokenizer)
    session.add_image(v6_dir / "red.png")
    expected = session.ask(q, max_new_tokens=5).run()
    assert record["answer"] == expected.text and record["n_new_tokens"] == len(expected.token_ids) > 0
