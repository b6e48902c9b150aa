"""`quantize(model, fmt)`: weight-only fp16 / int8 / int4 for decoding on any machine.

What changes: every block's large matrices (time mix receptance/key/value/output/gate,
channel mix key/value/receptance) and the head become `QuantLinear` layers, in place.
What stays: embeddings, norms, token-shift mixes, decay and bonus vectors, and the LoRA
matrices' parameters (small and sensitive); the vision towers and projector of a
VisualRWKV (they run once per image). On CPU the RWKV-7 LoRA matrices also get a
no-grad fp16-packed copy (2e-4 relative error, ~3x faster than MKL for these shapes).

`fp16` is fp16 weight storage with the model's activations (unlike `--dtype`, which sets
the compute dtype); int8 is per output channel; int4 is groupwise (group 128) with
error-minimising scales, its head in int8 by default (`head=` picks another format).

    from vrwkv_core import quantize
    quantize(vlm, "int8")        # returns vlm; vlm.rwkv.quant == "int8"
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from vrwkv_core.errors import VrwkvError
from vrwkv_core.model.rwkv.layers import Linear
from vrwkv_core.model.rwkv.quant import FORMATS, QuantLinear, int4_group

HEAD_DEFAULT = {"fp16": "fp16", "int8": "int8", "int4": "int8"}
LORA_NAMES = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def _language_model(model: nn.Module) -> nn.Module:
    return getattr(model, "rwkv", model)


def layer_format(fmt: str, n_in: int) -> tuple[str, int | None]:
    """(format, int4 group) for a matrix with `n_in` inputs: int4 falls back to int8 when no
    kernel group size divides n_in."""
    if fmt != "int4":
        return fmt, None
    group = int4_group(n_in)
    return ("int4", group) if group is not None else ("int8", None)


def quantized_layer(weight: torch.Tensor, fmt: str) -> QuantLinear:
    """A QuantLinear of `weight` [out, in] in `fmt` (int4 falls back to int8 where it cannot)."""
    f, group = layer_format(fmt, weight.shape[1])
    return QuantLinear.from_linear(weight, f, group)


@torch.no_grad()
def quantize(model: nn.Module, fmt: str, head: str | None = None, lora: bool = True) -> Any:
    """Quantizes an RWKV-7/RWKV-6 LM (or the LM of a VisualRWKV) in place, returns `model`.

    `fmt` is fp16, int8 or int4; `head` the head's format (None: fp16 for fp16, int8 for
    int8 and int4); `lora=False` leaves the RWKV-7 LoRA matrices on their fp32 path.
    """
    if fmt not in FORMATS:
        raise VrwkvError(f"unknown quantization {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    head = head or HEAD_DEFAULT[fmt]
    if head not in FORMATS:
        raise VrwkvError(f"unknown head quantization {head!r}", hint=f"use one of {', '.join(FORMATS)}")
    lm = _language_model(model)
    if getattr(lm, "quant", None):
        raise VrwkvError(f"the model is already quantized ({lm.quant})")
    for parent in list(lm.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is Linear:
                f = head if child is lm.head else fmt
                parent._modules[name] = quantized_layer(child.weight, f)
    if lora:
        add_lora_fast(lm)
    lm.quant = fmt
    lm.quant_head = head
    return model


def add_lora_fast(lm: nn.Module) -> None:
    """fp16-packed no-grad copies of the RWKV-7 LoRA matrices (CPU, fp32 activations only:
    with bf16 activations the existing bf16-packed path is already as fast)."""
    for m in lm.modules():
        fast = getattr(m, "lora_fast", None)
        if fast is None:
            continue
        for name in LORA_NAMES:
            w = m._parameters.get(name)
            if w is not None and w.device.type == "cpu" and w.dtype == torch.float32:
                fast[name] = QuantLinear.from_linear(w.t(), "fp16")


__all__ = ["HEAD_DEFAULT", "layer_format", "quantize", "quantized_layer"]
