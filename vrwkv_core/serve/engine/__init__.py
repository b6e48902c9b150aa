"""The serving engine: a scheduler thread that batches RNN rows, and the prefix state cache."""

from vrwkv_core.serve.engine.cache import AnswerMemo, StateCache, prefix_key
from vrwkv_core.serve.engine.scheduler import (
    Delta,
    Engine,
    EngineRequest,
    Event,
    Failed,
    Finished,
    PromptImage,
    QueueFull,
    ShuttingDown,
    answer_text,
)

__all__ = ["AnswerMemo", "Delta", "Engine", "EngineRequest", "Event", "Failed", "Finished", "PromptImage",
           "QueueFull", "ShuttingDown", "StateCache", "answer_text", "prefix_key"]  # fmt: skip
