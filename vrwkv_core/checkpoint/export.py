"""Exporting our model folders as released files: the VisualRWKV `.pth` layout of the model's
family, or the LM alone as an RWKV-LM `.pth` (names without `rwkv.`) that the `rwkv` package loads.

    export_pth("out/tiny/finetune", "tiny.pth")                   # our dir -> released layout
    export_pth("out/tiny/finetune", "tiny-lm.pth", lm_only=True)  # RWKV-LM layout
    export_quantized("out/tiny/finetune", "int8", "out/tiny-int8")  # a quantized model dir

A quantized dir stores each quantized matrix as its codes and scales (`QuantLinear`'s
portable tensors: nothing packed for one CPU or torch version); loading it builds the
kernel layout from them without ever making the fp32 matrices.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from vrwkv_core.checkpoint.build import build_meta, lora_of
from vrwkv_core.checkpoint.formats import FORMATS
from vrwkv_core.checkpoint.load import load_checkpoint
from vrwkv_core.checkpoint.ours import CONFIG, WEIGHTS, read_recipe, save_pretrained
from vrwkv_core.checkpoint.tensors import check_names, lm_part, read_safetensors
from vrwkv_core.errors import CheckpointError
from vrwkv_core.fsutil import atomic_path
from vrwkv_core.model.rwkv.quant import FORMATS as QUANT_FORMATS, HEAD_DEFAULT, quantize_lm

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}



def _write_pth(tensors: dict[str, torch.Tensor], out: Path) -> None:
    """torch.save to a temp file beside `out`, then rename (atomic)."""
    with atomic_path(out) as tmp:
        torch.save(tensors, tmp)


def released_state_dict(
    sd: Mapping[str, torch.Tensor], version: str, dtype: torch.dtype = torch.float16, lm_only: bool = False
) -> dict[str, torch.Tensor]:
    """Our state dict -> the released names of `version`'s family (or, lm_only, the RWKV-LM
    names), floats cast to dtype."""
    named = lm_part(sd) if lm_only else FORMATS[version].to_released(sd)
    return {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in named.items()}


def export_pth(
    model_dir: str | Path, out: str | Path, dtype: str | torch.dtype = "fp16", lm_only: bool = False
) -> dict[str, Any]:
    """Writes one of our model dirs as a released VisualRWKV `.pth` (or the LM alone as an
    RWKV-LM `.pth`, names without `rwkv.`), atomically. Returns {path, tensors, bytes, dtype}."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    model_dir, out = Path(model_dir), Path(out)
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
    tensors = released_state_dict({k: sd[k] for k in order}, recipe.model.rwkv.version, dtype, lm_only)
    del sd
    _write_pth(tensors, out)
    return {"path": out, "tensors": len(tensors), "bytes": out.stat().st_size, "dtype": str(dtype).replace("torch.", "")}


def export_quantized(model: str | Path, fmt: str, out_dir: str | Path, head: str | None = None) -> dict[str, Any]:
    """Writes `model` (our dir, a released `.pth`, `hub:NAME`) with its language model quantized
    to `fmt` (fp16, int8, int4; the head in `head`, default as `quantize`) as a model dir
    (config.yaml + model.safetensors). Returns {path, tensors, bytes, quant}."""
    if fmt not in QUANT_FORMATS:
        raise CheckpointError(f"quantization {fmt!r} is not one of {', '.join(QUANT_FORMATS)}")
    vlm, recipe = load_checkpoint(model, device="cpu", dtype=torch.float32)
    if getattr(vlm.rwkv, "quant", None):
        raise CheckpointError(f"{model}: already quantized ({vlm.rwkv.quant})")
    quantize_lm(vlm.rwkv, fmt, head or HEAD_DEFAULT[fmt], lora=False)
    out = save_pretrained(vlm, out_dir, recipe)
    weights = out / WEIGHTS
    return {"path": out, "tensors": len(vlm.state_dict()), "bytes": weights.stat().st_size, "quant": fmt}
