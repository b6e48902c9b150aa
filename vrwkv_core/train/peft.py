"""Parameter-efficient training of a stage: LoRA / PiSSA / MiSS adapters (through `peft`) or
RWKV state tuning, set up from the stage's `peft` section.

Notable:
- The LM is frozen except its adapters (or its learned initial WKV state); parts the stage's
  `trainable` list names other than `rwkv` (the projector, the vision tower, `rwkv.head`)
  still train fully; `frozen` still wins.
- The base model is the stage's `init_from`; its sha256 goes into every checkpoint, and a
  resume against a different base is refused.
- last.ckpt holds only the trainable tensors (Lightning loads it non-strictly; the names are
  checked here), and the run dir gets adapter.safetensors instead of model.safetensors.
- State tuning trains `rwkv.state_wkv` with its own learning rate `state_lr` (same schedule).
- DeepSpeed ZeRO-3 is refused: it shards every weight, while the adapter file, the filtered
  last.ckpt and the base checks read whole tensors.

    run = setup_peft(model, recipe, "finetune")   # None for a stage without `peft.method`
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vrwkv_core.checkpoint.adapters import base_identity, inject, save_adapter
from vrwkv_core.errors import CheckpointError, RecipeError

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe
    from vrwkv_core.model.visual_rwkv import VisualRWKV

CKPT_KEY = "vrwkv_peft"  # last.ckpt: {"base": ..., "sha256": ..., "method": ..., "names": [...]}


class PeftRun:
    """A stage's peft setup: what trains, what its checkpoints hold, where its outputs go."""

    def __init__(self, recipe: "Recipe", stage: str, base: dict[str, str], pissa_init: dict[str, torch.Tensor]) -> None:
        self.recipe, self.stage = recipe, stage
        self.section = getattr(recipe, stage).peft
        self.method = self.section.method
        self.base = base
        self.pissa_init = pissa_init

    def param_groups(self, groups: list[dict[str, Any]], model: torch.nn.Module) -> list[dict[str, Any]]:
        """The optimizer groups with the learned state moved to its own (lr state_lr, no decay)."""
        state = model.rwkv.state_wkv
        if state is None:
            return groups
        for g in groups:
            g["params"] = [p for p in g["params"] if p is not state]
        return [g for g in groups if g["params"]] + [{"params": [state], "weight_decay": 0.0, "lr": self.section.state_lr}]

    def filter_checkpoint(self, checkpoint: dict[str, Any], module: torch.nn.Module) -> None:
        """Keeps only the trainable tensors in a Lightning checkpoint and records the base."""
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        sd = checkpoint["state_dict"]
        checkpoint["state_dict"] = {n: sd[n] for n in names}
        checkpoint[CKPT_KEY] = {**self.base, "method": str(self.method), "names": names}

    def check_checkpoint(self, checkpoint: dict[str, Any], module: torch.nn.Module, path: str = "last.ckpt") -> None:
        """Refuses (one line) a checkpoint of another base model or another peft setup."""
        saved = checkpoint.get(CKPT_KEY)
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: not a checkpoint of a peft run",
                                  hint="resume with the recipe that wrote it, or start fresh without --resume")  # fmt: skip
        if saved.get("sha256") != self.base["sha256"]:
            raise CheckpointError(f"{path}: trained on base {saved.get('base')} (sha256 {str(saved.get('sha256'))[:12]}), "
                                  f"but this run's base {self.base['base']} has sha256 {self.base['sha256'][:12]}",
                                  hint="resume with the base model the run started from")  # fmt: skip
        names = {n for n, p in module.named_parameters() if p.requires_grad}
        if set(saved.get("names", [])) != names or set(checkpoint.get("state_dict", {})) != names:
            raise CheckpointError(f"{path}: its trainable tensors differ from this run's "
                                  f"(method {saved.get('method')} there, {self.method} here)")  # fmt: skip

    def save(self, model: "VisualRWKV", out_dir: Path, recipe: "Recipe") -> Path:
        """The run dir: config.yaml, adapter.safetensors (+ state.safetensors for state tuning)."""
        return save_adapter(model, out_dir, recipe, self.stage, self.base, self.pissa_init)


ZERO3 = "deepspeed_stage_3"


def check_peft_strategy(recipe: "Recipe", stage: str) -> None:
    """Refuses (one line naming the keys) a peft stage under DeepSpeed ZeRO-3."""
    method = getattr(recipe, stage).peft.method
    if method is not None and recipe.hardware.strategy == ZERO3:
        raise RecipeError(f"hardware.strategy: {ZERO3} cannot train {stage}.peft (method {method}): ZeRO-3 "
                          "shards the weights, and a peft run saves and checks its adapters as whole tensors",
                          hint="adapters need little memory: use hardware.strategy=auto (one device) or ddp, "
                               f"or drop {stage}.peft")  # fmt: skip


def setup_peft(model: "VisualRWKV", recipe: "Recipe", stage: str) -> PeftRun | None:
    """Freezes the LM and adds the stage's adapters or learned state (after `apply_trainable`,
    whose choices for the other parts it keeps). None when the stage has no peft method."""
    st = getattr(recipe, stage)
    pf = st.peft
    if pf.method is None:
        return None
    check_peft_strategy(recipe, stage)
    if not st.init_from:
        raise RecipeError(f"{stage}.peft: needs {stage}.init_from (the base model the adapters are trained on)",
                          hint=f"set {stage}.init_from to a pretrain out_dir or a released .pth")  # fmt: skip
    base = base_identity(st.init_from)
    model.rwkv.requires_grad_(False)
    pissa: dict[str, torch.Tensor] = {}
    if pf.method == "state":
        model.rwkv.enable_state_tuning()
    else:
        pissa = inject(model.rwkv, pf)
    for part in st.trainable:  # rwkv.head / rwkv.emb listed on their own still train fully
        if part.startswith("rwkv.") and part not in st.frozen:
            getattr(model.rwkv, part.split(".", 1)[1]).requires_grad_(True)
    return PeftRun(recipe, stage, base, pissa)
