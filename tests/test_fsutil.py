"""Atomic writes (vrwkv_core.fsutil): content, file mode, cleanup on error, writers by filename."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from vrwkv_core.fsutil import FILE_MODE, atomic_open, atomic_path, atomic_write_bytes, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_text_and_bytes_replace_with_usual_mode(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "néw\n")
    assert target.read_text(encoding="utf-8") == "néw\n"
    assert _mode(target) == FILE_MODE == 0o666 & ~_umask()
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01", fsync=False)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.bin", "sub"]


def test_error_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "kept")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_path_keeps_suffix_and_fixes_safetensors_mode(tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "model.safetensors"
    (tmp_path / ".model.safetensors.tmp.safetensors").write_bytes(b"stale temp of a killed write")
    with atomic_path(target) as tmp:
        assert tmp == tmp_path / ".model.safetensors.tmp.safetensors" and not tmp.exists()
        save_file({"w": torch.arange(3.0)}, str(tmp))  # safetensors itself creates 0600
        assert not target.exists()
    assert torch.equal(load_file(str(target))["w"], torch.arange(3.0))
    assert _mode(target) == FILE_MODE
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_unique_temp_paths_for_concurrent_writers(tmp_path):
    with atomic_path(tmp_path / "x", unique=True) as a, atomic_path(tmp_path / "x", unique=True) as b:
        assert a != b and a.name.startswith(".x.") and b.name.endswith(".tmp")
        a.write_text("a")
        b.write_text("b")
    assert (tmp_path / "x").read_text() == "a"  # the outer one is renamed in last


def test_atomic_open_rejects_append(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "x", "a"):
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
