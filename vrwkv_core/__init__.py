"""vrwkv_core: VisualRWKV models, WKV kernels, data, training, inference and evaluation.

The public names load lazily so that `import vrwkv_core` (and `vrwkv --help`) stays fast:

    from vrwkv_core import RWKV7, RWKVState, VisualRWKV, RWKVTokenizer, load_recipe, ChatSession, quantize
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "RWKVTokenizer": "vrwkv_core.tokenizer",
    "load_recipe": "vrwkv_core.config",
    "RWKV7": "vrwkv_core.model.rwkv",
    "RWKV6": "vrwkv_core.model.rwkv",
    "RWKVState": "vrwkv_core.model.rwkv",
    "VisualRWKV": "vrwkv_core.model.visual_rwkv",
    "ChatSession": "vrwkv_core.infer.chat",
    "quantize": "vrwkv_core.infer.quantize",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vrwkv_core' has no attribute {name!r}")
