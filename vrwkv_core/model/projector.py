"""Projectors from vision features (D_v channels) to the LM width (n_embd).

- `mlp` (v7.00): y = LayerNorm(o_proj(x * sigmoid(gate(x)))); `gate` D_v x D_v and
  `o_proj` n_embd x D_v without bias, `ln_v` a LayerNorm with bias (the released names).
- `linear` (v6.0): one Linear without bias; as the model's `proj` its key is `proj.weight`.

The LayerNorm runs in float32 whatever the weights' dtype, so bf16 models keep sane
statistics over wide rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vrwkv_core.errors import RecipeError


class GatedMLPProjector(nn.Module):
    """y = LayerNorm(o_proj(x * sigmoid(gate(x))))."""

    def __init__(self, in_dim: int, n_embd: int) -> None:
        super().__init__()
        self.gate = nn.Linear(in_dim, in_dim, bias=False)
        self.o_proj = nn.Linear(in_dim, n_embd, bias=False)
        self.ln_v = nn.LayerNorm(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.o_proj(x * torch.sigmoid(self.gate(x)))
        ln = self.ln_v
        y = F.layer_norm(h.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
        return y.to(h.dtype)


def build_projector(kind: str, in_dim: int, n_embd: int) -> nn.Module:
    """The projector named by `model.projector.type`."""
    if kind == "mlp":
        return GatedMLPProjector(in_dim, n_embd)
    if kind == "linear":
        return nn.Linear(in_dim, n_embd, bias=False)
    raise RecipeError(f"model.projector.type: {kind!r} is not one of mlp, linear")
