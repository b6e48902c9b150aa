"""Recipes: schema, precedence, errors that name the key and the file, every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from vrwkv_core.config import load_recipe, recipe_from_dict, recipe_to_dict, recipe_to_yaml, schema_reference
from vrwkv_core.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.model.rwkv.n_embd % recipe.model.rwkv.head_size == 0
    assert path.read_text().startswith("#"), "each recipe starts with the command that runs it"
    assert f"recipes/{path.name}" in path.read_text().split("\n\n")[0] or "vrwkv" in path.read_text()


def test_released_recipes_carry_v0700_hyperparameters():
    for size, (layers, width) in {"0b1": (12, 768), "0b4": (24, 1024), "1b5": (24, 2048)}.items():
        r = load_recipe(REPO / "recipes" / f"{size}.yaml")
        assert (r.model.rwkv.n_layer, r.model.rwkv.n_embd) == (layers, width)
        assert r.model.vision.towers == ["dino", "siglip", "sam"] and r.model.tokens_per_image == 1024
        assert (r.pretrain.lr_init, r.pretrain.lr_final) == (1e-3, 5e-5)
        assert (r.finetune.lr_init, r.finetune.lr_final) == (6e-5, 1.5e-5)
        assert r.pretrain.trainable == ["projector"] and r.finetune.frozen == ["rwkv.emb"]
        assert r.data.ctx_len == 2048 and r.hardware.precision == "bf16"
        assert r.hardware.strategy == "deepspeed_stage_1"


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("pretrain:\n  max_steps: 7\n  micro_batch: 3\n")
    r = load_recipe(path, ["pretrain.micro_batch=5"])
    assert r.pretrain.max_steps == 7 and r.pretrain.micro_batch == 5 and r.pretrain.grad_accum == 1


@pytest.mark.parametrize(
    "yaml_text, overrides, pattern",
    [
        ("pretrain:\n  max_step: 7\n", [], r"r\.yaml: unknown key 'pretrain\.max_step'"),
        ("pretrain:\n  max_steps: seven\n", [], r"r\.yaml: pretrain\.max_steps"),
        ("model:\n  rwkv: [1, 2\n", [], r"r\.yaml: malformed YAML \(line \d+"),
        ("model:\n  projector: {type: conv}\n", [], r"model\.projector\.type: 'conv' is not one of"),
        ("model:\n  tokens_per_image: 10\n", [], r"tokens_per_image: 10 is not a square"),
        ("", ["pretrain.lr_int=1"], r"unknown key 'pretrain\.lr_int'"),
        ("", ["--max-steps"], r"unknown option '--max-steps'"),
        ("- a\n- b\n", [], r"must be a mapping"),
    ],
)
def test_errors_name_key_and_file(tmp_path, yaml_text, overrides, pattern):
    path = tmp_path / "r.yaml"
    path.write_text(yaml_text)
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(path, overrides)


def test_did_you_mean_hint(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("hardware:\n  precison: bf16\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.hint == "did you mean 'hardware.precision'?"


def test_missing_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_round_trip():
    r = load_recipe(REPO / "recipes" / "tiny.yaml")
    import yaml

    again = recipe_from_dict(yaml.safe_load(recipe_to_yaml(r)))
    assert recipe_to_dict(again) == recipe_to_dict(r)


def test_readme_recipe_reference_is_in_sync():
    readme = (REPO / "README.md").read_text()
    assert schema_reference() in readme, "regenerate the README's recipe reference: python -m vrwkv_core.config"


def test_v6_1b6_recipe_loads() -> None:
    from vrwkv_core.config import load_recipe

    r = load_recipe(REPO / "recipes" / "v6-1b6.yaml")
    m = r.model
    assert (m.rwkv.version, m.rwkv.n_layer, m.rwkv.n_embd) == ("x060", 24, 2048)
    assert (m.vision.towers, m.vision.image_size) == (["clip"], 336)
    assert (m.projector.type, m.tokens_per_image, m.image_position) == ("linear", 577, "middle")
    assert (r.pretrain.lr_init, r.pretrain.lr_final, r.finetune.lr_init, r.finetune.lr_final) == (1e-3, 1e-5, 3e-5, 1.5e-5)
    assert r.finetune.frozen == ["rwkv.emb"] and r.pretrain.trainable == ["projector"]
    assert (r.data.ctx_len, r.hardware.precision, r.hardware.strategy) == (1024, "bf16", "deepspeed_stage_1")  # the v6.0 scripts: ctx 1024 (issue 23)
    # stage 1 trained with the image first, stage 2 (and chat/eval) with the model's middle
    assert (r.pretrain.image_position, r.finetune.image_position) == ("first", None)
