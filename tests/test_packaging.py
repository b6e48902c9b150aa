"""The installed package: a wheel carries the CUDA sources (top-level cuda_ops/ in the tree) and
the vocab, and `vrwkv env` finds the sources from a wheel installed in a fresh venv."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("wkv7.cu", "wkv7.h", "wkv7_op.cpp")


@pytest.mark.slow
def test_wheel_ships_the_cuda_sources_and_env_finds_them(tmp_path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = wheels.glob("vrwkv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for src in SOURCES:
        assert f"vrwkv_core/cuda_ops/{src}" in names
    assert "vrwkv_core/rwkv_vocab_v20230424.txt" in names
    assert not any(n.startswith("cuda_ops/") for n in names)  # no top-level `cuda_ops` package claimed

    # A fresh venv that sees this machine's torch etc., with the wheel installed in it (its own
    # site-packages come first, so the wheel shadows the editable checkout).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True,
                   timeout=600)  # fmt: skip
    out = subprocess.run([venv / "bin" / "vrwkv", "env", "--no-build", "--json"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, check=True).stdout  # fmt: skip
    info = json.loads(out.strip().splitlines()[-1])
    where = info["CUDA WKV sources"]
    assert str(venv) in where and "site-packages" in where and "missing" not in where, where
