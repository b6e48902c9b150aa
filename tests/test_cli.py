"""The root CLI: the command set, help, plugins, the error boundary, --version."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from vrwkv_cli.main import BUILTINS, build_cli, run

REPO = Path(__file__).resolve().parents[1]
EXPECTED = ["download", "prepare-data", "pretrain", "finetune", "eval", "chat", "serve", "bench", "env", "export"]


def _vrwkv(*args: str, extra_path: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    paths = [str(REPO)] + ([str(extra_path)] if extra_path else [])
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", "from vrwkv_cli.main import main; main()", *args],
        capture_output=True, text=True, env=full_env, timeout=120,
    )


def test_builtins_match_pyproject():
    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vrwkv.commands"]
    assert eps == BUILTINS


def test_command_set_is_pinned():
    assert list(build_cli().commands) == EXPECTED


def test_help_lists_commands_and_imports_no_torch():
    t0 = time.perf_counter()
    proc = _vrwkv("--help")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    for name in EXPECTED:
        assert name in proc.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from vrwkv_cli.main import run; run(['--help']); print('torch' in sys.modules)"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert probe.stdout.strip().splitlines()[-1] == "False"
    assert elapsed < 10  # generous on a loaded CI box; typically ~0.3 s


@pytest.mark.parametrize(
    "command, line",
    [
        (["pretrain", "--help"], "vrwkv pretrain recipes/tiny.yaml"),
        (["finetune", "--help"], "--resume"),
        (["bench", "--help"], "wkv"),
        (["env", "--help"], "vrwkv env"),
    ],
)
def test_help_lines(command, line, capsys):
    assert run(command) == 0
    assert line in capsys.readouterr().out


def test_every_command_help_shows_an_example(capsys):
    cli = build_cli()
    for name in EXPECTED:
        subs = getattr(cli.commands[name], "commands", None) or {}
        for argv in [[name]] if not subs else [[name, sub] for sub in subs]:
            assert run([*argv, "--help"]) == 0, argv
            assert "Example" in capsys.readouterr().out, argv


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.startswith("vrwkv ")


def test_known_error_is_one_line_and_exit_code(tmp_path, capsys):
    code = run(["pretrain", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert code == 1
    assert "missing.yaml" in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: ") and len(lines) == 2


def test_debug_shows_traceback(tmp_path, capsys):
    run(["--debug", "pretrain", str(tmp_path / "missing.yaml")])
    assert "Traceback" in capsys.readouterr().err


def test_unknown_flag_hints_key_value(capsys):
    code = run(["pretrain", str(REPO / "recipes" / "tiny.yaml"), "--max-steps", "3"])
    err = capsys.readouterr().err
    assert code == 1 and "key=value" in err


def test_print_config_is_pure_yaml(capsys):
    import yaml

    assert run(["pretrain", str(REPO / "recipes" / "tiny.yaml"), "pretrain.max_steps=7", "--print-config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["pretrain"]["max_steps"] == 7 and data["model"]["vision"]["towers"] == ["tiny"]


def _fake_dist(root: Path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))


def test_plugins_add_warn_and_cannot_shadow(tmp_path):
    _fake_dist(
        tmp_path,
        "vrwkv_hello",
        """
        [vrwkv.commands]
        hello = vrwkv_hello_mod:app
        broken = vrwkv_broken_mod:app
        chat = vrwkv_hello_mod:app
        """,
        {
            "vrwkv_hello_mod": """
                import typer
                app = typer.Typer()
                @app.command()
                def hello(name: str = "world"):
                    \"\"\"Say hello.\"\"\"
                    print(f"hello {name}")
            """,
            "vrwkv_broken_mod": "raise ImportError('plugin is broken')\n",
        },
    )
    proc = _vrwkv("hello", "--name", "rwkv", extra_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello rwkv"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert any("'broken'" in w and "plugin is broken" in w for w in warnings)
    assert any("'chat'" in w and "shadow" in w for w in warnings)
    # every built-in still works, and chat is still ours
    proc = _vrwkv("chat", "--help", extra_path=tmp_path)
    assert proc.returncode == 0 and "--image" in proc.stdout


@pytest.mark.parametrize("args, clock", [([], "wall"), (["--clock", "cpu"], "cpu")])
def test_bench_lm_passes_the_clock_through(args, clock, monkeypatch, capsys):
    import json

    import vrwkv_core.bench.lm as lm

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return [{"model": "vrwkv", "phase": "decode", "tokens_per_s": 1.0}]

    monkeypatch.setattr(lm, "run_lm_bench", fake)
    assert run(["bench", "lm", "--json", *args]) == 0
    assert seen["clock"] == clock
    assert json.loads(capsys.readouterr().out)["rows"][0]["model"] == "vrwkv"
    assert run(["bench", "lm", "--clock", "gpu"]) != 0  # not a clock


def test_result_tables_are_never_cut_when_piped(capsys) -> None:
    """Bench/eval tables printed to a pipe or log keep every value whole (no "…" at 80 columns)."""
    from vrwkv_cli.common import print_rows

    row = {"model": "vrwkv-rwkv6-fp32-a-long-model-name", "phase": "prefill", "tokens_per_second": 51.1634,
           "ratio": 1.265, "bytes_per_token": 6_438_912_000, "read_bandwidth_gb_s": 34.86, "greedy_match": True}
    print_rows([row], "RWKV-6 L24 D2048 random weights")
    out = capsys.readouterr().out
    assert "…" not in out and max(len(line) for line in out.splitlines()) > 80
    assert "vrwkv-rwkv6-fp32-a-long-model-name" in out and "6438912000" in out.replace(",", "")
