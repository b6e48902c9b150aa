"""`quantize(model, fmt)`: weight-only fp16 / int8 / int4 for decoding on any machine.

What changes: every block's large matrices (time mix receptance/key/value/output/gate,
channel mix key/value/receptance) and the head become `QuantLinear` layers
(`vrwkv_core.model.rwkv.quant`), in place. What stays: embeddings, norms, token-shift
mixes, decay and bonus vectors, and the LoRA matrices' parameters (small and sensitive);
the vision towers and projector of a VisualRWKV (they run once per image). On CPU the
RWKV-7 LoRA matrices also get a no-grad fp16-packed copy (2e-4 relative error, ~3x
faster than MKL for these shapes).

`fp16` is fp16 weight storage with the model's activations (unlike `--dtype`, which sets
the compute dtype); int8 is per output channel; int4 is groupwise (group 128) with
error-minimising scales, its head in int8 by default (`head=` picks another format).

    from vrwkv_core import quantize
    quantize(vlm, "int8")        # returns vlm; vlm.rwkv.quant == "int8"
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from vrwkv_core.errors import VrwkvError
from vrwkv_core.model.rwkv.quant import FORMATS, HEAD_DEFAULT, quantize_lm


def quantize(model: nn.Module, fmt: str, head: str | None = None, lora: bool = True) -> Any:
    """Quantizes an RWKV-7/RWKV-6 LM (or the LM of a VisualRWKV) in place, returns `model`.

    `fmt` is fp16, int8 or int4; `head` the head's format (None: fp16 for fp16, else int8); `lora=False` leaves the RWKV-7 LoRA matrices on their fp32 path.
    """
    if fmt not in FORMATS:
        raise VrwkvError(f"unknown quantization {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    head = head or HEAD_DEFAULT[fmt]
    if head not in FORMATS:
        raise VrwkvError(f"unknown head quantization {head!r}", hint=f"use one of {', '.join(FORMATS)}")
    lm = getattr(model, "rwkv", model)
    if getattr(lm, "quant", None):
        raise VrwkvError(f"the model is already quantized ({lm.quant})")
    quantize_lm(lm, fmt, head, lora)
    return model


__all__ = ["FORMATS", "quantize"]
