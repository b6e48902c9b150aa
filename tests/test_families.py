"""model/families.py: one entry per LM family, chosen once by version; the WKV backend reaches the
kernel from the recipe key and from `--wkv-backend`."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from helpers import build_tiny_vlm
from PIL import Image

from vrwkv_core.bench.lm import random_rwkv7_weights
from vrwkv_core.bench.lm6 import random_rwkv6_weights
from vrwkv_core.config import RWKV_VERSIONS, WKV_BACKENDS, RWKVSection, load_recipe
from vrwkv_core.errors import RecipeError, VrwkvError
from vrwkv_core.infer.chat import ChatSession
from vrwkv_core.infer.loading import load_model
from vrwkv_core.kernels import BACKENDS
from vrwkv_core.model import FAMILIES, RWKV6, RWKV7, family, family_of_state_dict
from vrwkv_core.model.families import lm_config_from_state_dict

TINY7 = RWKVSection(n_layer=2, n_embd=64, head_size=32, vocab_size=300)
TINY6 = dataclasses.replace(TINY7, version="x060")


def test_one_family_per_version_and_config_lists_them() -> None:
    assert tuple(FAMILIES) == RWKV_VERSIONS and WKV_BACKENDS == BACKENDS
    assert family("x070").lm_class is RWKV7 and family("x060").lm_class is RWKV6
    assert (family("x070").prompt_style, family("x060").prompt_style) == ("v7", "v6")
    assert family("x060").reverse_image_rows and not family("x070").reverse_image_rows
    assert family("x070").dim_ffn(768) == 3072 and family("x060").dim_ffn(2048) == 7168
    assert family("x060").dim_ffn(2048, 100) == 100
    with pytest.raises(RecipeError, match="model.rwkv.version: unknown 'x080'"):
        family("x080")


def test_family_of_a_state_dict_is_read_off_its_tensors() -> None:
    sd7, sd6 = random_rwkv7_weights(TINY7, seed=0), random_rwkv6_weights(TINY6, seed=0)
    assert family_of_state_dict(sd7) is FAMILIES["x070"] and family_of_state_dict(sd6) is FAMILIES["x060"]
    cfg6, _ = lm_config_from_state_dict(sd6)
    assert (cfg6.version, cfg6.n_layer, cfg6.n_embd, cfg6.vocab_size) == ("x060", 2, 64, 300)


def test_recipe_key_reaches_the_kernel(monkeypatch) -> None:
    wkv7 = importlib.import_module("vrwkv_core.kernels.wkv7")  # the module (the package exports the function)
    calls = []
    original = wkv7.wkv7_reference

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(wkv7, "wkv7_reference", spy)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model = RWKV7(dataclasses.replace(TINY7, wkv_backend="reference")).eval()
    with torch.no_grad():
        out, _ = model(ids)
        assert len(calls) == TINY7.n_layer  # every layer ran the reference loop
        model.use_wkv_backend("chunked")
        again, _ = model(ids)
    assert len(calls) == TINY7.n_layer and torch.allclose(out, again, atol=1e-5)
    with pytest.raises(ValueError, match="no backend 'cuda'"):
        RWKV6(TINY6).use_wkv_backend("cuda")  # there is no CUDA WKV-6 kernel
    with pytest.raises(ValueError, match="model.rwkv.wkv_backend"):
        RWKV6(dataclasses.replace(TINY6, wkv_backend="cuda"))


def test_recipe_refuses_an_unknown_backend(tmp_path) -> None:
    with pytest.raises(RecipeError, match="model.rwkv.wkv_backend: 'triton' is not one of"):
        load_recipe("recipes/tiny.yaml", ["model.rwkv.wkv_backend=triton"])


def test_wkv_backend_flag_reaches_the_loaded_model(tmp_path) -> None:
    vlm = build_tiny_vlm()
    recipe = load_recipe("recipes/tiny.yaml", [f"model.rwkv.n_embd={vlm.config.rwkv.n_embd}"])
    vlm.save_pretrained(tmp_path / "m", dataclasses.replace(recipe, model=vlm.config))
    assert load_model(tmp_path / "m", device="cpu").rwkv.cfg.wkv_backend == "auto"
    assert load_model(tmp_path / "m", device="cpu", wkv_backend="reference").rwkv.cfg.wkv_backend == "reference"
    with pytest.raises(VrwkvError, match="--wkv-backend: .*no backend 'triton'"):
        load_model(tmp_path / "m", device="cpu", wkv_backend="triton")


def test_chat_tiles_each_image_once(monkeypatch, tokenizer) -> None:
    vlm = build_tiny_vlm()
    views = []
    original = vlm.image_processor.views
    monkeypatch.setattr(vlm.image_processor, "views", lambda im: views.append(im.size) or original(im))
    chat = ChatSession(vlm, tokenizer)
    chat.add_image(Image.new("RGB", (40, 30), "red"))
    "".join(chat.ask("What is it?", max_new_tokens=2))
    chat.reset()
    "".join(chat.ask("And now?", max_new_tokens=2))  # the kept image is queued again
    assert views == [(40, 30)]
