"""Adapters and learned states of parameter-efficient runs: building them on a model through
`peft`, their run files, applying them to a base model, and merging them into its weights.

A peft run dir holds `config.yaml` (the recipe), `adapter.safetensors` (only the tensors the
run trained: LoRA/MiSS matrices or the initial WKV state `rwkv.state_wkv`, plus parts trained
fully such as the projector) whose metadata names the base model and its sha256, and for state
tuning `state.safetensors` (an RWKVState file, batch 1). PiSSA moves the weight's principal
part into A and B, so its file also holds the initial A0, B0 (`pissa_init.<name>`): loading
rebuilds the residual W - scale * B0 A0 exactly, with no SVD.

    vlm = load_visual_rwkv("out/tiny/pretrain")
    apply_adapter(vlm, "out/tiny/finetune-lora", base="out/tiny/pretrain", merge=True)
    export_merged("out/tiny/finetune-lora", "out/tiny/merged")
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vrwkv_core.checkpoint.load import load_checkpoint
from vrwkv_core.checkpoint.ours import WEIGHTS, read_recipe, save_pretrained
from vrwkv_core.config import PeftSection, Recipe, recipe_to_dict, recipe_to_yaml
from vrwkv_core.errors import CheckpointError
from vrwkv_core.fsutil import atomic_path
from vrwkv_core.hub import resolve
from vrwkv_core.hub.integrity import hash_file
from vrwkv_core.model.visual_rwkv import VisualRWKV

ADAPTER = "adapter.safetensors"
STATE = "state.safetensors"
ADAPTER_FORMAT = "vrwkv-adapter"
PISSA = "pissa_init."
ADAPTER_NAME = "default"  # peft's adapter name


# -- building adapters ---------------------------------------------------------------
def target_pattern(targets: list[str]) -> str:
    """peft's `target_modules` regex (full match on names inside the LM) for our target names."""
    return r"blocks\.\d+\.(" + "|".join(re.escape(t) for t in targets) + ")"


def peft_config(pf: PeftSection, init: bool = True) -> Any:
    """The `peft` config of a lora/miss section; `init=False` skips PiSSA's SVD (the weights
    are loaded afterwards)."""
    from peft import LoraConfig, MissConfig

    pattern = target_pattern(list(pf.targets))
    if pf.method == "lora":
        init_w: Any = ("pissa" if pf.init == "pissa" else True) if init else False
        return LoraConfig(r=pf.r, lora_alpha=pf.alpha, lora_dropout=pf.dropout, target_modules=pattern,
                          init_lora_weights=init_w)  # fmt: skip
    if pf.method == "miss":
        return MissConfig(r=pf.r, miss_dropout=pf.dropout, target_modules=pattern, init_weights=True)
    raise ValueError(f"no peft adapter for method {pf.method!r}")


def inject(lm: torch.nn.Module, pf: PeftSection, init: bool = True) -> dict[str, torch.Tensor]:
    """Adds the section's adapters to the LM in place (peft freezes everything else in it).
    For PiSSA returns the initial A0, B0 ({name: tensor}, our full names), else {}."""
    from peft import inject_adapter_in_model

    training = lm.training
    inject_adapter_in_model(peft_config(pf, init), lm, adapter_name=ADAPTER_NAME)
    lm.train(training)  # new layers start in training mode
    if not (init and pf.method == "lora" and pf.init == "pissa"):
        return {}
    return {f"{PISSA}rwkv.{n}": p.detach().clone() for n, p in lm.named_parameters() if ".lora_" in n}


def adapter_layers(lm: torch.nn.Module) -> list[tuple[str, Any]]:
    """(name, layer) of every peft adapter layer in the LM."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in lm.named_modules() if isinstance(m, BaseTunerLayer)]


@torch.no_grad()
def merge_adapters(lm: torch.nn.Module) -> int:
    """Folds every adapter into its base weight (peft's merge) and puts the base layer back in
    its place, so the LM is plain again. Returns the number of layers merged."""
    layers = adapter_layers(lm)
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(lm.get_submodule(parent_name) if parent_name else lm, child, layer.get_base_layer())
    return len(layers)


@torch.no_grad()
def _pissa_residual(lm: torch.nn.Module, init: dict[str, torch.Tensor]) -> None:
    """W <- W - scale * B0 A0 in every PiSSA layer (what peft's PiSSA init leaves in the base)."""
    for name, layer in adapter_layers(lm):
        a0 = init[f"{PISSA}rwkv.{name}.lora_A.{ADAPTER_NAME}.weight"].float()
        b0 = init[f"{PISSA}rwkv.{name}.lora_B.{ADAPTER_NAME}.weight"].float()
        w = layer.get_base_layer().weight
        w.copy_((w.float() - layer.scaling[ADAPTER_NAME] * (b0 @ a0).to(w.device)).to(w.dtype))


# -- base identity -------------------------------------------------------------------
def weights_file(spec: str | Path) -> Path:
    """The file whose sha256 identifies a model: a dir's model.safetensors, a .pth, or hub:NAME's file."""
    text = str(spec)
    path = resolve(text) if text.startswith("hub:") else Path(text).expanduser()
    if not path.exists() and not text.startswith("hub:"):
        path = Path(resolve(text))
    path = Path(path)
    return path / WEIGHTS if path.is_dir() else path


def base_identity(spec: str | Path) -> dict[str, str]:
    """{"base": spec as given, "sha256": of its weights file}."""
    path = weights_file(spec)
    if not path.is_file():
        raise CheckpointError(f"{spec}: base model not found ({path} is missing)")
    return {"base": str(spec), "sha256": hash_file(path)["sha256"]}


def check_base(run: str | Path, meta: dict[str, str], spec: str | Path) -> None:
    """One line when `spec` is not the model the run was trained on (by sha256)."""
    got = base_identity(spec)["sha256"]
    if got != meta.get("base_sha256"):
        raise CheckpointError(
            f"{run}: trained on base {meta.get('base')} (sha256 {str(meta.get('base_sha256'))[:12]}), "
            f"but {spec} has sha256 {got[:12]}",
            hint=f"pass the run's base model ({meta.get('base')})",
        )


# -- run files -----------------------------------------------------------------------
def save_adapter(model: VisualRWKV, out_dir: str | Path, recipe: Recipe, stage: str, base: dict[str, str],
                 extra: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Writes a peft run dir: config.yaml, adapter.safetensors (the trainable tensors + `extra`,
    e.g. PiSSA's initial A0/B0) and, for state tuning, state.safetensors; atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({k: t.detach().contiguous().cpu() for k, t in (extra or {}).items()})
    pf = getattr(recipe, stage).peft
    meta = {"format": ADAPTER_FORMAT, "method": str(pf.method), "stage": stage,
            "peft": json.dumps(recipe_to_dict(recipe)[stage]["peft"]), "base": base["base"],
            "base_sha256": base["sha256"], "model_config": json.dumps(recipe_to_dict(recipe)["model"])}  # fmt: skip
    with atomic_path(out / "config.yaml") as c_tmp, atomic_path(out / ADAPTER) as w_tmp:
        save_file(tensors, str(w_tmp), metadata=meta)
        c_tmp.write_text(recipe_to_yaml(recipe), encoding="utf-8")
    initial = model.rwkv.initial_state()
    if initial is not None:
        initial.save(out / STATE)
    return out


def is_adapter_run(path: str | Path) -> bool:
    """Whether `path` is a peft run dir (it has adapter.safetensors)."""
    return (Path(path) / ADAPTER).is_file()


def read_adapter(run: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], PeftSection]:
    """(tensors, metadata, the run's peft section) of a peft run dir."""
    path = Path(run) / ADAPTER
    if not path.is_file():
        raise CheckpointError(f"{run}: no {ADAPTER}; not a peft run dir",
                              hint="a run trained with a `peft` section writes it (finetune.peft.method)")  # fmt: skip
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise CheckpointError(f"{path}: cannot be read ({err})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not a vrwkv adapter file")
    pf = PeftSection(**json.loads(meta["peft"]))
    return tensors, meta, pf


def apply_adapter(vlm: VisualRWKV, run: str | Path, base: str | Path | None = None, merge: bool = False) -> str:
    """Puts a peft run's tensors on `vlm` (its base model, checked by sha256 when `base` names
    it): adapter layers (merged into the weights with `merge`), the learned initial state, and
    the parts the run trained fully. Returns the method."""
    tensors, meta, pf = read_adapter(run)
    if base is not None:
        check_base(run, meta, base)
    pissa = {k: v for k, v in tensors.items() if k.startswith(PISSA)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(PISSA)}
    training = vlm.training
    if pf.method == "state":
        vlm.rwkv.enable_state_tuning()
    else:
        inject(vlm.rwkv, pf, init=False)
        if pissa:
            _pissa_residual(vlm.rwkv, pissa)
    own = dict(vlm.named_parameters())
    wanted = {n for n in own if ".lora_" in n or ".miss_" in n or n.endswith("state_wkv")}
    missing = sorted(wanted - tensors.keys())
    unknown = sorted(k for k in tensors if k not in own or own[k].shape != tensors[k].shape)
    if missing or unknown:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unknown[:3])}"
        raise CheckpointError(f"{Path(run) / ADAPTER}: does not fit this model ({what})")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
    vlm.requires_grad_(False)
    if merge and pf.method != "state":
        merge_adapters(vlm.rwkv)
    vlm.train(training)
    return str(pf.method)


def export_merged(run: str | Path, out_dir: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """An ordinary model dir from a peft run: LoRA/PiSSA/MiSS folded into the weights; a state
    run writes its `state.safetensors` beside the model (the parts it trained included).
    `base` defaults to the base the run recorded. Returns {path, method, state}."""
    _, meta, _ = read_adapter(run)
    base = base if base is not None else meta["base"]
    if not weights_file(base).exists():
        raise CheckpointError(f"{run}: its base model {base} is not there", hint="pass the base with --base")
    model, _ = load_checkpoint(base)
    method = apply_adapter(model, run, base, merge=True)
    recipe = read_recipe(run)
    stage = meta.get("stage", "finetune")
    recipe = replace(recipe, **{stage: replace(getattr(recipe, stage), peft=PeftSection())})
    out = Path(out_dir)
    state = None
    if method == "state":
        state = out / STATE
        out.mkdir(parents=True, exist_ok=True)
        model.rwkv.initial_state().save(state)
        model.rwkv.set_initial_state(None)
    save_pretrained(model, out, recipe)
    return {"path": out, "method": method, "state": state}
