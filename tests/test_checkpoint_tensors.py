"""checkpoint/tensors.py (the one reader of weight files) and the alignment of loaded weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vrwkv_core.checkpoint.build import ALIGN, aligned
from vrwkv_core.checkpoint.tensors import read_weights
from vrwkv_core.errors import CheckpointError


def test_one_reader_for_every_format(tmp_path) -> None:
    sd = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")  # one wrapping level, as training files have
    for name in ("w.safetensors", "w.pth", "wrapped.pth"):
        got = read_weights(tmp_path / name)
        assert sorted(got) == ["a", "b"] and all(torch.equal(got[k], sd[k]) for k in sd), name


def test_sharded_safetensors(tmp_path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))  # fmt: skip
    got = read_weights(index)
    assert torch.equal(got["a"], torch.zeros(2)) and torch.equal(got["b"], torch.ones(3))
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="1 listed tensors are in no shard, e.g. c"):
        read_weights(index)
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a file name beside the index"):
        read_weights(index)
    index.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a safetensors shard index"):
        read_weights(index)


def test_loaded_weights_are_aligned_whatever_the_file_layout(tmp_path) -> None:
    # A 5-byte tensor first shifts every later tensor off 64-byte alignment in the file.
    save_file({"a": torch.zeros(5, dtype=torch.uint8), "w": torch.randn(64, 64)}, str(tmp_path / "w.safetensors"))
    w = read_weights(tmp_path / "w.safetensors")["w"]
    fixed = aligned(w)
    assert fixed.data_ptr() % ALIGN == 0 and torch.equal(fixed, w)
    fresh = torch.randn(8, 8)
    assert aligned(fresh) is fresh  # torch's own allocations are not copied
