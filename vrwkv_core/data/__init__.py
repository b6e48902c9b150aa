"""Data: the v7.00 conversation template, `prepare-data`, synthetic shapes, training dataset.

The torch-based names (`VisionLanguageDataset`, `collate`, `ResumableSampler`) load on
first use, so `prepare-data` and the CLI's `--help` do not import torch.
"""

from __future__ import annotations

from typing import Any

from vrwkv_core.data import dataset
from vrwkv_core.data.archive import ExtractReport, extract_archive
from vrwkv_core.data.conversation import (
    IGNORE_INDEX,
    IMAGE_MARKER,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    STOP_TOKEN_ID,
    EncodedConversation,
    encode_conversation,
    encode_conversation_info,
    encode_generation_prompt,
    encode_turn,
    normalize_conversations,
)
from vrwkv_core.data.prepare import PrepareReport, prepare_llava
from vrwkv_core.data.shapes import prepare_shapes
from vrwkv_core.data.validate import ImageLimits

_LAZY = {"VisionLanguageDataset", "collate", "ResumableSampler", "record_images"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_MARKER",
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "STOP_TOKEN_ID",
    "EncodedConversation",
    "ExtractReport",
    "ImageLimits",
    "PrepareReport",
    "ResumableSampler",
    "VisionLanguageDataset",
    "collate",
    "encode_conversation",
    "encode_conversation_info",
    "encode_generation_prompt",
    "encode_turn",
    "extract_archive",
    "normalize_conversations",
    "prepare_llava",
    "prepare_shapes",
    "record_images",
]
