"""Inference: sampling, RNN-mode generation (streaming and batched), the chat session.

    from vrwkv_core.infer import ChatSession, GenerationConfig, generate, generate_batch, load_model
"""

from vrwkv_core.infer.batch import DecodeBatch
from vrwkv_core.infer.chat import ChatSession, ContextLengthWarning, image_key, load_image
from vrwkv_core.infer.generate import (
    Generation,
    GenerationResult,
    decode_step,
    generate,
    generate_batch,
    generate_many,
    generate_stream,
    prefill,
    take_token,
)
from vrwkv_core.infer.loading import context_length, load_model, resolve_device, resolve_dtype
from vrwkv_core.infer.sampling import GenerationConfig, Sampler

__all__ = [
    "ChatSession",
    "ContextLengthWarning",
    "DecodeBatch",
    "Generation",
    "GenerationConfig",
    "GenerationResult",
    "Sampler",
    "context_length",
    "decode_step",
    "generate",
    "generate_batch",
    "generate_many",
    "generate_stream",
    "image_key",
    "load_image",
    "load_model",
    "prefill",
    "resolve_device",
    "resolve_dtype",
    "take_token",
]
