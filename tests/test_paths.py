"""Cache locations (vrwkv_core.paths): one variable, VRWKV_CACHE_DIR, read by every user."""

from __future__ import annotations

from pathlib import Path

from vrwkv_core import paths


def test_vrwkv_cache_dir_moves_every_vrwkv_cache(tmp_path, monkeypatch):
    from vrwkv_core.hub import integrity
    from vrwkv_core.kernels.wkv7 import cuda

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("VRWKV_CACHE_DIR", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c"
    assert paths.verified_record() == tmp_path / "c" / "verified.json"
    assert cuda.build_directory(64).parent.parent == tmp_path / "c" / "extensions"
    integrity._update(str(tmp_path / "w.pth"), {"sha256": "0" * 64})
    assert (tmp_path / "c" / "verified.json").is_file()
    assert integrity.record_entry(tmp_path / "w.pth") == {"sha256": "0" * 64}


def test_defaults_follow_xdg_and_huggingface(tmp_path, monkeypatch):
    for var in ("VRWKV_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path / "vrwkv"
    assert paths.extensions_dir() == tmp_path / "vrwkv" / "extensions"
    assert paths.hf_cache_dir() == tmp_path / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert paths.hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert paths.extensions_dir() == tmp_path / "ext"


def test_vrwkv_env_reports_the_paths(tmp_path, monkeypatch):
    from vrwkv_core.env import collect_env

    monkeypatch.setenv("VRWKV_CACHE_DIR", str(tmp_path))
    info = collect_env(try_build=False)
    assert Path(info["vrwkv cache"]) == tmp_path
    assert Path(info["verified hashes"]) == tmp_path / "verified.json"
    assert {"kernel builds", "hub cache"} <= info.keys()
