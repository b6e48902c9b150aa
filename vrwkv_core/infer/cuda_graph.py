"""The single-token decode step captured in a CUDA graph, one graph per batch size.

On a GPU, decoding one token of a small model launches a few hundred tiny kernels, and the
launches, not the arithmetic, set the speed (0.1B at ~73 tok/s on an H200). A CUDA graph
replays the whole step as one launch. `CudaGraphDecoder(lm)` captures a graph the first
time it sees a batch size (after a few warm-up steps on a side stream, as torch's docs
ask) and then, per step, copies the tokens and the state into the graph's static inputs,
replays, and returns copies of the static outputs (so the caller may keep any state).

    graphs = enable_cuda_graphs(vlm.rwkv)      # decode_step uses it from now on
    logits, state = decode_step(vlm.rwkv, tokens, state)

It imports without CUDA; `enable_cuda_graphs` on a CPU model returns None and changes
nothing. `scripts/gpu_check_decode.py` checks graph decode == eager decode and times both.
"""

from __future__ import annotations

from typing import Any

import torch

from vrwkv_core.model.rwkv.state import PARTS, RWKVState

WARMUP_STEPS = 3


class _Graph:
    """One captured step for a fixed batch size: static tokens/state in, logits/state out."""

    def __init__(self, lm: torch.nn.Module, batch: int) -> None:
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=_device(lm))
        self.state = RWKVState.zeros(lm, batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP_STEPS):  # lazy inits and autotuning happen outside the capture
                lm(self.tokens, state=self.state, logits="last")
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits, self.out = lm(self.tokens, state=self.state, logits="last")

    def step(self, tokens: torch.Tensor, state: RWKVState) -> tuple[torch.Tensor, RWKVState]:
        self.tokens.copy_(tokens.view(-1, 1))
        for part in PARTS:
            for dst, src in zip(getattr(self.state, part), getattr(state, part)):
                dst.copy_(src)
        self.graph.replay()
        return self.logits[:, -1].float(), self.out.clone()


class CudaGraphDecoder:
    """Single-token decode steps of `lm` through CUDA graphs, captured per batch size."""

    def __init__(self, lm: torch.nn.Module, max_graphs: int = 16) -> None:
        self.lm = lm
        self.max_graphs = max_graphs
        self.graphs: dict[int, _Graph] = {}

    def step(self, tokens: torch.Tensor, state: RWKVState) -> tuple[torch.Tensor, RWKVState]:
        """(next logits [B, V] float32, new state) for one token per row, as `decode_step`."""
        batch = tokens.numel()
        graph = self.graphs.get(batch)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:  # many sizes (continuous batching): drop the oldest
                self.graphs.pop(next(iter(self.graphs)))
            graph = self.graphs[batch] = _Graph(self.lm, batch)
        return graph.step(tokens.to(self.graphs[batch].tokens.device), state)


def _device(lm: torch.nn.Module) -> torch.device:
    return next(lm.parameters()).device


def enable_cuda_graphs(lm: torch.nn.Module) -> Any:
    """Makes `decode_step` run `lm` (an RWKV LM on a CUDA device) through CUDA graphs; returns
    the decoder, or None (nothing changed) for a model that is not on CUDA."""
    if _device(lm).type != "cuda" or not torch.cuda.is_available():
        return None
    lm.cuda_graphs = CudaGraphDecoder(lm)
    return lm.cuda_graphs


def disable_cuda_graphs(lm: torch.nn.Module) -> None:
    """Back to eager decode steps (frees the graphs)."""
    lm.__dict__.pop("cuda_graphs", None)


__all__ = ["CudaGraphDecoder", "disable_cuda_graphs", "enable_cuda_graphs"]
