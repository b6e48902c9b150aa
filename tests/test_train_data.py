"""train/data.py: the stage's dataset settings (per-stage image placement)."""

from __future__ import annotations

from pathlib import Path

import pytest




REPO = Path(__file__).resolve().parents[1]


def test_stage_image_position_decides_the_training_samples(tmp_path: Path) -> None:
    """Each stage's dataset uses stage.image_position, falling back to model.image_position."""
    from vrwkv_core.config import load_recipe
    from vrwkv_core.data.conversation import normalize_turn_text
    from vrwkv_core.errors import RecipeError
    from vrwkv_core.train.data import StageData

    records = tmp_path / "data.jsonl"
    records.write_text('{"id": "0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n')
    paths = {"records": records, "images": tmp_path}
    recipe = load_recipe(REPO / "recipes" / "v6-1b6.yaml", ["data.val_fraction=0"])
    q = "<image>\nWhat is it?\nAnswer the question using a single word or phrase."
    placed = {}
    for stage in ("pretrain", "finetune"):
        position = StageData(recipe, stage, paths, lambda im: im, 4).dataset.image_position
        placed[stage] = normalize_turn_text("human", q, position)
    assert placed["pretrain"].startswith("<image>\nWhat is it?")  # stage 1: the image first
    assert placed["finetune"].startswith("What is it?\n<image>\nWhat is it?")  # stage 2: the sandwich

    same = load_recipe(REPO / "recipes" / "v6-1b6.yaml", ["data.val_fraction=0", "pretrain.image_position=null"])
    assert StageData(same, "pretrain", paths, lambda im: im, 4).dataset.image_position == "middle"
    with pytest.raises(RecipeError, match="pretrain.image_position"):
        load_recipe(REPO / "recipes" / "v6-1b6.yaml", ["pretrain.image_position=end"])
