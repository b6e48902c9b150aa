"""Released VisualRWKV v7.00 `.pth` files: safe reading, config inference, strict loading, export.

A released file is a flat state dict in half precision: `rwkv.*` (the RWKV-7 LM, the
names of an RWKV-7 World `.pth` behind the prefix), `vit.<tower>_featurizer.*` and
`proj.*`. Nothing else describes the model, so the config is read off the tensors:
LM dims and LoRA widths from `rwkv.*` (`rwkv7.config_from_state_dict`), towers from the
`vit.` prefixes, the image size from the DINOv2/SigLIP position-embedding grid, the
projector type from `proj.gate.weight` (mlp) or `proj.weight` (linear). Loading is
strict: every tensor of the file is used and every parameter filled.

Reading never unpickles anything but tensors (`torch.load(weights_only=True)`, memory
mapped for zip files), and each way a file can be wrong is one line naming the file.

    model, recipe = load_released("VisualRWKV-v0700-0B1-v1.0-20250109.pth")
    export_pth("out/tiny/finetune", "tiny.pth")                # our dir -> released layout
    export_pth("out/tiny/finetune", "tiny-lm.pth", lm_only=True)  # RWKV-LM layout
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from vrwkv_core.errors import CheckpointError
from vrwkv_core.fsutil import atomic_path

if TYPE_CHECKING:
    from vrwkv_core.config import ModelSection, Recipe
    from vrwkv_core.model.rwkv7 import LoraDims
    from vrwkv_core.model.visual_rwkv import VisualRWKV

WORLD_VOCAB = 65536
DEFAULT_IMAGE_SIZE = 448
DEFAULT_TOKENS_PER_IMAGE = 1024
RELEASED_TOWERS = ("dino", "siglip", "sam")  # v7.00 concatenation order
_GRID_TOWERS = {"dino": 14, "siglip": 14}  # towers whose pos_embed grid gives the image size
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # legacy torch.save files start with a pickle protocol opcode


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth` (weights only, memory-mapped when the file is a zip).

    A foreign file, a truncated one, a pickle with Python objects (never executed) or
    a file that is not a flat dict of tensors is one CheckpointError line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file, not a PyTorch checkpoint")
    is_zip = head == _ZIP_MAGIC
    if not is_zip and head[0] != _PICKLE_PROTO:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then refuses anyway
            sd: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:  # torch.load raises UnpicklingError, RuntimeError, EOFError, KeyError...
        raise _load_error(path, err, is_zip) from None
    return _flat_tensors(sd, path)


def _load_error(path: Path, err: BaseException, is_zip: bool) -> CheckpointError:
    """One line for each way `torch.load(weights_only=True)` refuses a file."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return CheckpointError(
            f"{path}: refused: the file holds a pickled Python object ({found.group(1)}), not only tensors; "
            "nothing in it was run",
            hint="load only checkpoints from sources you trust; vrwkv reads tensors and never runs pickled code",
        )
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        op = re.search(r"Unsupported operand \d+", text)
        why = f" ({op.group(0).lower()})" if op else ""
        return CheckpointError(f"{path}: not a weights-only PyTorch checkpoint: its pickle was refused{why}; nothing in it was run")
    if is_zip or isinstance(err, EOFError):  # a zip header but unreadable: cut short or damaged
        return CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({_first_line(err)})")
    return CheckpointError(f"{path}: not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)})")


def _flat_tensors(sd: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict; unwraps one `state_dict`/`model`/`module` level."""
    if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    bad = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict of tensors ({len(bad)} non-tensor entries, e.g. {bad[0]!r})")
    return dict(sd)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.pth` file (by suffix; other suffixes are read as `.pth`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from vrwkv_core.model.checkpoint import read_safetensors

        return read_safetensors(path)
    return read_pth(path)


def check_vocab(rows: int, source: str) -> None:
    """The World tokenizer has 65536 ids; any other embedding is a checkpoint we cannot use."""
    if rows != WORLD_VOCAB:
        raise CheckpointError(
            f"{source}: vocab size {rows}, the World tokenizer needs {WORLD_VOCAB}",
            hint="vrwkv runs RWKV World models (rwkv_vocab_v20230424); this checkpoint has another tokenizer",
        )


def lm_part(sd: Mapping[str, torch.Tensor], prefix: str = "rwkv.") -> dict[str, torch.Tensor]:
    """The LM tensors of a VisualRWKV state dict, without their prefix."""
    return {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}


def towers_in(sd: Mapping[str, Any], source: str) -> list[str]:
    """Towers present (`vit.<name>_featurizer.*`), in the released concatenation order."""
    from vrwkv_core.model.vision import TOWERS

    found = []
    for name in sd:
        if name.startswith("vit."):
            m = re.match(r"vit\.(\w+?)_featurizer\.", name)
            tower = m.group(1) if m else name.split(".")[1]
            if tower not in found:
                found.append(tower)
    for tower in found:
        if tower == "tiny":
            raise CheckpointError(
                f"{source}: holds a tiny tower, whose shape only its config.yaml records",
                hint="load the model folder (config.yaml + model.safetensors) instead",
            )
        if tower not in TOWERS:
            raise CheckpointError(f"{source}: unknown vision tower {tower!r} (vit.{tower}_featurizer.*)")
    order = [t for t in RELEASED_TOWERS if t in found]
    return order + [t for t in found if t not in order]


def infer_image_size(sd: Mapping[str, torch.Tensor], towers: list[str], source: str) -> int:
    """The square input size of the 448-class towers, from their position-embedding grid."""
    for tower in towers:
        patch = _GRID_TOWERS.get(tower)
        pe = sd.get(f"vit.{tower}_featurizer.pos_embed")
        if patch is None or pe is None:
            continue
        n = pe.shape[1]  # timm: DINOv2-reg and SigLIP keep no prefix tokens in pos_embed
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointError(f"{source}: vit.{tower}_featurizer.pos_embed has {n} positions, not a square grid")
        return side * patch
    return DEFAULT_IMAGE_SIZE


def infer_model_config(
    sd: Mapping[str, torch.Tensor], source: str, tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE
) -> tuple["ModelSection", "LoraDims"]:
    """The ModelSection (and LoRA widths) of a released-layout state dict, from its tensors."""
    from vrwkv_core.config import ModelSection, ProjectorSection, VisionSection
    from vrwkv_core.model.rwkv7 import config_from_state_dict

    if "rwkv.emb.weight" not in sd:
        if "emb.weight" in sd and "blocks.0.att.r_k" in sd:
            raise CheckpointError(
                f"{source}: an RWKV-7 language model, not a VisualRWKV checkpoint",
                hint="load it with RWKV7.from_checkpoint, or start a VisualRWKV from it with model.rwkv.checkpoint in a recipe",
            )
        example = next(iter(sd), None)
        raise CheckpointError(f"{source}: not a VisualRWKV checkpoint (no rwkv.emb.weight; first tensor: {example!r})")
    check_vocab(sd["rwkv.emb.weight"].shape[0], source)
    rwkv_cfg, lora = config_from_state_dict(lm_part(sd), source)
    towers = towers_in(sd, source)
    if not towers:
        raise CheckpointError(f"{source}: no vision tower (vit.<tower>_featurizer.*) in the checkpoint")
    if "proj.gate.weight" in sd:
        projector = "mlp"
    elif "proj.weight" in sd:
        projector = "linear"
    else:
        raise CheckpointError(f"{source}: no projector (neither proj.gate.weight nor proj.weight)")
    cfg = ModelSection(
        rwkv=rwkv_cfg,
        vision=VisionSection(towers=towers, image_size=infer_image_size(sd, towers, source)),
        projector=ProjectorSection(type=projector),
        tokens_per_image=tokens_per_image,
    )
    return cfg, lora


def from_released_state_dict(
    sd: Mapping[str, torch.Tensor],
    source: str = "<state dict>",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    model_cfg: "ModelSection | None" = None,
    tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE,
) -> "VisualRWKV":
    """A VisualRWKV holding exactly the tensors of a released-layout state dict (strict).

    The config is inferred unless `model_cfg` is given. dtype None: bfloat16 on CUDA,
    float32 elsewhere; device "meta" checks names and shapes without any data.
    """
    from vrwkv_core.model.checkpoint import assign_state, build_meta
    from vrwkv_core.model.lm_weights import check_names
    from vrwkv_core.model.rwkv7 import config_from_state_dict
    from vrwkv_core.model.released_v6 import from_released_v6_state_dict, is_released_v6
    from vrwkv_core.model.rwkv6 import lm_config_from_state_dict
    from vrwkv_core.model.vision import ours_to_released, released_to_ours

    if model_cfg is None and is_released_v6(sd):
        return from_released_v6_state_dict(sd, source, device, dtype)
    if model_cfg is None:
        model_cfg, lora = infer_model_config(sd, source, tokens_per_image)
    else:
        if "rwkv.emb.weight" in sd:
            check_vocab(sd["rwkv.emb.weight"].shape[0], source)
        lora = lm_config_from_state_dict(lm_part(sd), source)[1]
    model = build_meta(model_cfg, lora)
    expected = {ours_to_released(k): tuple(t.shape) for k, t in model.state_dict().items()}
    check_names(expected, {k: tuple(t.shape) for k, t in sd.items()}, source)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    assign_state(model, {released_to_ours(k): t for k, t in sd.items()}, source, device, dtype)
    return model.eval()


def load_released(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE,
    model_cfg: "ModelSection | None" = None,
) -> tuple["VisualRWKV", "Recipe"]:
    """Loads a released VisualRWKV `.pth` strictly; returns (model in eval mode, a recipe for it)."""
    from vrwkv_core.config import Recipe

    path = Path(path)
    sd = read_weights_file(path)
    model = from_released_state_dict(sd, str(path), device, dtype, model_cfg, tokens_per_image)
    del sd
    return model, Recipe(name=path.stem, model=model.config)


def _write_pth(tensors: dict[str, torch.Tensor], out: Path) -> None:
    """torch.save to a temp file beside `out`, then rename (atomic)."""
    with atomic_path(out) as tmp:
        torch.save(tensors, tmp)


def released_state_dict(
    sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float16, lm_only: bool = False
) -> dict[str, torch.Tensor]:
    """Our state dict -> the released names (or, lm_only, the RWKV-LM names), floats cast to dtype."""
    from vrwkv_core.model.vision import ours_to_released

    items = lm_part(sd).items() if lm_only else ((ours_to_released(k), t) for k, t in sd.items())
    return {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in items}


def export_pth(
    model_dir: str | Path, out: str | Path, dtype: str | torch.dtype = "fp16", lm_only: bool = False
) -> dict[str, Any]:
    """Writes one of our model dirs as a released VisualRWKV `.pth` (or the LM alone as an
    RWKV-LM `.pth`, names without `rwkv.`), atomically. Returns {path, tensors, bytes, dtype}."""
    from vrwkv_core.model.checkpoint import WEIGHTS, build_meta, lora_of, read_recipe, read_safetensors
    from vrwkv_core.model.lm_weights import check_names

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    model_dir, out = Path(model_dir), Path(out)
    from vrwkv_core.model.checkpoint import CONFIG

    if out.is_dir():
        raise CheckpointError(f"{out}: --out is a folder; give the .pth file to write", hint=f"e.g. --out {out / 'model.pth'}")
    for source in (model_dir / CONFIG, model_dir / WEIGHTS):
        if out.exists() and source.exists() and os.path.samefile(out, source):
            raise CheckpointError(f"{out}: --out is the model's own {source.name}; writing it would destroy the input",
                                  hint="choose another --out")  # fmt: skip
    recipe = read_recipe(model_dir)
    sd = read_safetensors(model_dir / WEIGHTS)
    order = build_meta(recipe.model, lora_of(sd, str(model_dir / WEIGHTS))).state_dict()
    check_names({k: tuple(t.shape) for k, t in order.items()},
                {k: tuple(t.shape) for k, t in sd.items()}, str(model_dir / WEIGHTS))  # fmt: skip
    # module order, as released files have it (safetensors reads back sorted by name)
    if recipe.model.rwkv.version == "x060" and not lm_only:
        from vrwkv_core.model.released_v6 import released_v6_state_dict

        tensors = released_v6_state_dict({k: sd[k] for k in order}, dtype)
    else:
        tensors = released_state_dict({k: sd[k] for k in order}, dtype, lm_only)
    del sd
    _write_pth(tensors, out)
    return {"path": out, "tensors": len(tensors), "bytes": out.stat().st_size, "dtype": str(dtype).replace("torch.", "")}
