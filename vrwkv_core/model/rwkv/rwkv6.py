"""The RWKV-6 ("x060", Finch) language model, beside RWKV-7 with the same contract.

Notable:
- Parameter names are the official RWKV-6 layout (`emb.weight`, `blocks.{i}.att.time_maa_x`,
  ..., `head.weight`, in the order of RWKV-LM's modules), so `state_dict()` is an RWKV-6
  World checkpoint and `from_checkpoint` loads the released `.pth` files unchanged (dims and
  LoRA widths read from the tensors; loading is strict).
- `forward(idx | embeds, state, logits="all"|"last"|"hidden", backend, reverse_spans)`
  runs any T >= 1 through `vrwkv_core.kernels.wkv6.wkv6`; T == 1 takes a direct fp32
  state update (the decode path).
- The state is `RWKVState` (per layer: att shift [B,C], WKV state fp32 [B,H,N,N], ffn
  shift [B,C]). Caution: RWKV-6's WKV matrix is indexed S[key, value] (rows k, columns
  v: RWKV-LM's and the `rwkv` package's convention), the transpose of RWKV-7's.
- VisualRWKV v6.0's bidirectional scan: `reverse_spans` names, per sample, row ranges
  (the 576 CLIP patch rows of each image) that every odd layer (i % 2 == 1) sees in
  reverse order; they are restored after the block. Rows outside the spans keep their
  order in every layer, so a prefill holding each span whole, followed by RNN decoding,
  equals one forward over the concatenation.

Time mix per token (shared/reference/VISUALRWKV_V060.md, "RWKV-6 (x060) block"):
dx = x_{t-1} - x_t; five data-dependent token-shift mixes from one LoRA (w, k, v, r, g);
log-decay log_w = -exp(time_decay + LoRA(x_w)) in float32; the WKV bonus u = time_faaaa;
out = output(GroupNorm(y) * silu(gate)). The exponent is clamped at 7 before exp: any
larger value already gives a decay of exactly 0 (e^-1097 underflows even in float64), and
it keeps exp from reaching inf, whose backward would be 0 * inf = NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vrwkv_core.config import RWKVSection
from vrwkv_core.errors import CheckpointError
from vrwkv_core.kernels import wkv6
from vrwkv_core.kernels.wkv6 import BACKENDS
from vrwkv_core.model.rwkv.layers import (
    Linear,
    RWKVLanguageModel,
    cpu_step_threads,
    last_row,
    layer_norm,
    linear,
    shifted,
)
from vrwkv_core.model.rwkv.state import RWKVState

GROUPNORM_EPS = 64e-5  # RWKV-LM: 1e-5 * head_size_divisor**2 with divisor 8

DECAY_EXP_MAX = 7.0  # see the module docstring

Span = tuple[int, int]


@dataclass(frozen=True)
class LoraDims6:
    """Widths of the time mix's two low-rank projections."""

    mix: int
    """D_mix: time_maa_w1 is [C, 5 * mix], time_maa_w2 [5, mix, C]."""
    decay: int
    """D_dec: time_decay_w1 is [C, decay], time_decay_w2 [decay, C]."""

    @classmethod
    def default(cls, n_embd: int) -> "LoraDims6":
        """RWKV-LM's x060 widths: 32/64, and 64/128 from C = 4096 up."""
        return cls(mix=64, decay=128) if n_embd >= 4096 else cls(mix=32, decay=64)


def default_dim_ffn(n_embd: int) -> int:
    """RWKV-LM's x060 channel-mix width: int(3.5 * C // 32 * 32)."""
    return int(3.5 * n_embd // 32 * 32)


class TimeMix6(nn.Module):
    """RWKV-6 time mix of one block (parameter order as in RWKV-LM's RWKV_Tmix_x060)."""

    def __init__(self, cfg: RWKVSection, layer_id: int, lora: LoraDims6) -> None:
        super().__init__()
        C, N = cfg.n_embd, cfg.head_size
        H = C // N
        self.layer_id, self.n_head, self.head_size, self.d_mix = layer_id, H, N, lora.mix

        def vec() -> nn.Parameter:
            return nn.Parameter(torch.empty(1, 1, C))

        self.time_maa_x, self.time_maa_w, self.time_maa_k = vec(), vec(), vec()
        self.time_maa_v, self.time_maa_r, self.time_maa_g = vec(), vec(), vec()
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * lora.mix))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, lora.mix, C))
        self.time_decay = vec()
        self.time_decay_w1 = nn.Parameter(torch.empty(C, lora.decay))
        self.time_decay_w2 = nn.Parameter(torch.empty(lora.decay, C))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.output = Linear(C, C)
        self.gate = Linear(C, C)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)

    def _mixes(self, x: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        """The five mixed inputs (w, k, v, r, g) stacked: [5, *x.shape]."""
        P = self._parameters
        xxx = torch.addcmul(x, xx, P["time_maa_x"].view(-1))
        lead = x.shape[:-1]
        m = torch.tanh(xxx @ P["time_maa_w1"]).view(-1, 5, self.d_mix).transpose(0, 1)  # [5, M, D]
        m = torch.bmm(m, P["time_maa_w2"]).view(5, *lead, -1)
        maa = torch.cat([P[f"time_maa_{c}"] for c in "wkvrg"]).view(5, *([1] * len(lead)), -1)
        return torch.addcmul(x, xx, maa + m)

    def _log_decay(self, xw: torch.Tensor) -> torch.Tensor:
        """log_w = -exp(time_decay + tanh(xw @ w1) @ w2), float32."""
        P = self._parameters
        z = P["time_decay"].view(-1) + torch.tanh(xw @ P["time_decay_w1"]) @ P["time_decay_w2"]
        return -torch.exp(z.float().clamp(max=DECAY_EXP_MAX))

    def _out(self, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """output(GroupNorm(y) * g) for y [M, C] (normalised in float32)."""
        lnx = self._modules["ln_x"]._parameters
        y = F.group_norm(y.float(), self.n_head, lnx["weight"].float(), lnx["bias"].float(), GROUPNORM_EPS)
        return linear(self._modules["output"], y.to(g.dtype) * g)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, C], the ln1 output
        shift: torch.Tensor | None,  # [B, C]
        wkv_state: torch.Tensor | None,  # [B, H, N, N] fp32, [key, value]
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output [B,T,C], new WKV state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        M = self._modules
        xw, xk, xv, xr, xg = self._mixes(x, shifted(x, shift) - x).unbind(0)
        r, k, v = linear(M["receptance"], xr), linear(M["key"], xk), linear(M["value"], xv)
        g = F.silu(linear(M["gate"], xg))
        shape = (B, T, H, N)
        y, wkv_state = wkv6(
            r.view(shape), self._log_decay(xw).view(shape), k.view(shape), v.view(shape),
            self.time_faaaa, wkv_state, backend=backend,
        )  # fmt: skip
        return self._out(y.reshape(B * T, C), g.reshape(B * T, C)).view(B, T, C), wkv_state

    def step(
        self,
        x: torch.Tensor,  # [B, C], the ln1 output of one token
        shift: torch.Tensor | None,
        wkv_state: torch.Tensor | None,  # [B, H, N, N] fp32, [key, value]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token (the decode path): `forward` at T=1 with a direct fp32 state update."""
        B, C = x.shape
        H, N = self.n_head, self.head_size
        M = self._modules
        xx = -x if shift is None else shift.to(x.dtype) - x
        xw, xk, xv, xr, xg = self._mixes(x, xx).unbind(0)
        r, k, v = linear(M["receptance"], xr), linear(M["key"], xk), linear(M["value"], xv)
        g = F.silu(linear(M["gate"], xg))
        w = self._log_decay(xw).exp().view(B, H, N, 1)
        f32 = torch.float32
        r4, k4, v4 = r.to(f32).view(B, H, N, 1), k.to(f32).view(B, H, N, 1), v.to(f32).view(B, H, 1, N)
        S = wkv_state if wkv_state is not None else x.new_zeros(B, H, N, N, dtype=f32)
        kv = k4 * v4  # [B, H, N(key), N(value)]
        u = self._parameters["time_faaaa"].to(f32).view(1, H, N, 1)
        y = (r4 * torch.addcmul(S, u, kv)).sum(-2)  # r^T (diag(u) k v^T + S): [B, H, N(value)]
        S = torch.addcmul(kv, w, S)
        return self._out(y.view(B, C), g), S


class ChannelMix6(nn.Module):
    """RWKV-6 channel mix: sigmoid(receptance(x_r)) * value(relu(key(x_k))^2)."""

    def __init__(self, cfg: RWKVSection, dim_ffn: int) -> None:
        super().__init__()
        C = cfg.n_embd
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, dim_ffn)
        self.receptance = Linear(C, C)
        self.value = Linear(dim_ffn, C)

    def _mix(self, x: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        P, M = self._parameters, self._modules
        xk = torch.addcmul(x, xx, P["time_maa_k"].view(-1))
        xr = torch.addcmul(x, xx, P["time_maa_r"].view(-1))
        kv = linear(M["value"], torch.relu(linear(M["key"], xk)).square())
        return torch.sigmoid(linear(M["receptance"], xr)) * kv

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        return self._mix(x, shifted(x, shift) - x)

    def step(self, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """One token: x [B, C]."""
        return self._mix(x, -x if shift is None else shift.to(x.dtype) - x)


class Block6(nn.Module):
    """ln0 (layer 0 only), then x += att(ln1(x)); x += ffn(ln2(x))."""

    def __init__(self, cfg: RWKVSection, layer_id: int, lora: LoraDims6, dim_ffn: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix6(cfg, layer_id, lora)
        self.ffn = ChannelMix6(cfg, dim_ffn)

    def forward(self, x, att_shift, wkv_state, ffn_shift, backend: str, order: torch.Tensor | None = None):
        """Returns (x, att_shift, wkv_state, ffn_shift). `order` [B, T]: an involutive row
        permutation applied before the block and undone after it (the reversal)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        if order is not None:
            x = _permute_rows(x, order)
        h = self.ln1(x)
        dx, wkv_state = self.att(h, att_shift, wkv_state, backend)
        att_shift = last_row(h)
        x = x + dx
        h = self.ln2(x)
        x = x + self.ffn(h, ffn_shift)
        if order is not None:
            x = _permute_rows(x, order)
        return x, att_shift, wkv_state, last_row(h)

    def step(self, x, att_shift, wkv_state, ffn_shift):
        """One token, x [B, C]: returns what `forward` returns, with [B, C] tensors."""
        M = self._modules
        if self.layer_id == 0:
            x = layer_norm(M["ln0"], x)
        h = layer_norm(M["ln1"], x)
        dx, wkv_state = M["att"].step(h, att_shift, wkv_state)
        x = x + dx
        h2 = layer_norm(M["ln2"], x)
        x = x + M["ffn"].step(h2, ffn_shift)
        return x, h, wkv_state, h2


def _permute_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x[b, order[b, t]] for x [B, T, C]."""
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def reversal_order(
    spans: Sequence[Span | Sequence[Span] | None], batch: int, length: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """The [B, T] row order that reverses each sample's spans (half-open (start, end) row
    ranges) and keeps every other row in place; None when there is nothing to reverse.

    `spans[b]` is one (start, end), a list of them, or None. Spans must lie in [0, T) and
    not overlap: a span cut between two calls would not be reversed as a whole.
    """
    if len(spans) != batch:
        raise ValueError(f"reverse_spans has {len(spans)} entries for a batch of {batch}")
    order = None
    for b, item in enumerate(spans):
        if item is None:
            continue
        ranges = [item] if len(item) == 2 and not isinstance(item[0], (tuple, list)) else item
        taken = -1
        for start, end in sorted((int(s), int(e)) for s, e in ranges):
            if not 0 <= start <= end <= length or start <= taken:
                raise ValueError(f"sample {b}: span ({start}, {end}) is outside [0, {length}] or overlaps another")
            taken = end - 1
            if end - start < 2:
                continue
            if order is None:
                order = torch.arange(length).repeat(batch, 1)
            order[b, start:end] = torch.arange(end - 1, start - 1, -1)
    return order.to(device) if order is not None else None


class RWKV6(RWKVLanguageModel):
    """RWKV-6 language model; `state_dict()` is the official RWKV-6 layout."""

    version = "x060"
    label = "RWKV-6"
    wkv_backends = BACKENDS

    def __init__(self, cfg: RWKVSection, lora: LoraDims6 | None = None, *, init: bool = True) -> None:
        """A freshly initialised model (RWKV-LM's x060 init, see `reset_parameters`).

        `lora` defaults to RWKV-LM's widths for `cfg.n_embd`; `init=False` leaves the
        weights on the meta device (for loaders that assign tensors afterwards).
        """
        super().__init__()
        dim_ffn = cfg.dim_ffn or default_dim_ffn(cfg.n_embd)
        self._build(cfg, lora or LoraDims6.default(cfg.n_embd), dim_ffn, Block6, init)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-LM's x060 init: token-shift ramps 1 - (i/C)^(ratio) per layer, decay bias
        -6 + 5 (i/(C-1))^(0.7 + 1.3 r01), bonus r01 (1 - i/(C-1)) + zigzag, LoRA down
        matrices zero and up matrices U(+-0.01), ln_x weight ((i+1)/L)^0.7, output and FFN
        value/receptance zero, key and gate at 0.1 gain. Orthogonal matrices are replaced
        by uniform ones with the same entry scale (no QR of large matrices)."""
        C, L = self.n_embd, self.n_layer
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.normal_(self.head.weight, std=0.5 / C**0.5)
        for ln in (m for m in self.modules() if isinstance(m, nn.LayerNorm)):
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)
        n = torch.arange(C, dtype=torch.float64)
        ddd = (n / C).view(1, 1, C)
        bound = 3**0.5 / C**0.5  # uniform with the entry std of an orthogonal C x C matrix

        def unif(p: torch.Tensor, gain: float) -> None:
            nn.init.uniform_(p, -gain * bound, gain * bound)

        for i, block in enumerate(self.blocks):
            att, ffn = block.att, block.ffn
            r01 = i / max(L - 1, 1)
            r10 = 1.0 - i / L
            for name in ("x", "w", "k"):
                getattr(att, f"time_maa_{name}").copy_(1.0 - ddd.pow(r10))
            att.time_maa_v.copy_(1.0 - (ddd.pow(r10) + 0.3 * r01))
            att.time_maa_r.copy_(1.0 - ddd.pow(0.5 * r10))
            att.time_maa_g.copy_(1.0 - ddd.pow(0.5 * r10))
            nn.init.zeros_(att.time_maa_w1)
            nn.init.uniform_(att.time_maa_w2, -0.01, 0.01)
            att.time_decay.copy_((-6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01)).view(1, 1, C))
            nn.init.zeros_(att.time_decay_w1)
            nn.init.uniform_(att.time_decay_w2, -0.01, 0.01)
            zigzag = ((n + 1) % 3 - 1) * 0.1
            att.time_faaaa.copy_((r01 * (1 - n / (C - 1)) + zigzag).view_as(att.time_faaaa))
            unif(att.receptance.weight, 1.0)
            unif(att.key.weight, 0.1)
            unif(att.value.weight, 1.0)
            unif(att.gate.weight, 0.1)
            nn.init.zeros_(att.output.weight)
            nn.init.constant_(att.ln_x.weight, ((i + 1) / L) ** 0.7)
            nn.init.zeros_(att.ln_x.bias)
            ffn.time_maa_k.copy_(1.0 - ddd.pow(r10))
            ffn.time_maa_r.copy_(1.0 - ddd.pow(r10))
            unif(ffn.key.weight, 1.0)
            nn.init.zeros_(ffn.receptance.weight)
            nn.init.zeros_(ffn.value.weight)

    def forward(
        self,
        idx: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        state: RWKVState | None = None,
        logits: str = "all",
        backend: str | None = None,
        reverse_spans: Sequence[Span | Sequence[Span] | None] | None = None,
    ) -> tuple[torch.Tensor, RWKVState]:
        """Runs ids [B,T] (or raw embeddings [B,T,C]) from `state` (None: zeros).

        Returns (out, new_state): logits [B,T,V] ("all"), [B,1,V] ("last"), or the ln_out
        output [B,T,C] ("hidden"). `state` is not modified. `reverse_spans` (one entry per
        sample, see `reversal_order`) turns on the odd-layer reversal of those rows.
        """
        x = self._input(idx, embeds, state, logits)
        state = self._start(state, x)  # the learned initial state, if any
        backend = backend or self.cfg.wkv_backend
        B, T = x.shape[:2]
        order = reversal_order(reverse_spans, B, T, x.device) if reverse_spans is not None else None
        one = T == 1
        ckpt = self._checkpointing(one)
        if one:
            x = x[:, 0]
        layers = []
        with cpu_step_threads(x, one, quant=bool(self.quant)):  # one-row fp32 CPU decode: see there
            for i, block in enumerate(self.blocks):
                s = (state.att_shift[i], state.wkv[i], state.ffn_shift[i]) if state is not None else (None, None, None)
                block_order = order if i % 2 == 1 else None
                if one:
                    out = block.step(x, *s)
                elif ckpt:
                    out = checkpoint(block, x, *s, backend, block_order, use_reentrant=False)
                else:
                    out = block(x, *s, backend, block_order)
                x = out[0]
                layers.append(out[1:])
            return self._output(x, one, logits, layers)


def is_rwkv6_state_dict(sd: Mapping[str, object]) -> bool:
    """True for an official-layout x060 LM state dict (no prefix)."""
    return "blocks.0.att.time_faaaa" in sd and "blocks.0.att.time_maa_w1" in sd


def config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> tuple[RWKVSection, LoraDims6]:
    """Dimensions of an official-layout RWKV-6 state dict (no `rwkv.` prefix): n_layer,
    n_embd, head_size (time_faaaa is [H, N]), vocab_size, dim_ffn and the LoRA widths."""
    need = ("emb.weight", "blocks.0.att.time_faaaa", "blocks.0.att.time_maa_w1", "blocks.0.att.time_decay_w1",
            "blocks.0.ffn.key.weight")  # fmt: skip
    missing = [n for n in need if n not in sd]
    if missing:
        hint = None
        if "blocks.0.att.r_k" in sd:
            hint = "this looks like an RWKV-7 (x070) checkpoint: load it with RWKV7.from_checkpoint"
        elif any(k.startswith("rwkv.") for k in sd):
            hint = "this looks like a VisualRWKV file: load it with VisualRWKV.from_checkpoint"
        raise CheckpointError(f"{source}: not an RWKV-6 checkpoint (missing {', '.join(missing[:3])})", hint=hint)
    vocab, C = sd["emb.weight"].shape
    faaaa = sd["blocks.0.att.time_faaaa"]
    if faaaa.dim() != 2 or faaaa.shape[0] * faaaa.shape[1] != C:
        raise CheckpointError(f"{source}: blocks.0.att.time_faaaa has shape {tuple(faaaa.shape)}, "
                              f"expected [heads, head_size] with heads * head_size = n_embd {C}")  # fmt: skip
    mix_cols = sd["blocks.0.att.time_maa_w1"].shape[1]
    if mix_cols % 5:
        raise CheckpointError(f"{source}: blocks.0.att.time_maa_w1 has {mix_cols} columns, not 5 x D_mix")
    layers = {int(n.split(".")[1]) for n in sd if n.startswith("blocks.") and n.split(".")[1].isdigit()}
    lora = LoraDims6(mix=mix_cols // 5, decay=sd["blocks.0.att.time_decay_w1"].shape[1])
    cfg = RWKVSection(version="x060", n_layer=max(layers) + 1, n_embd=C, head_size=faaaa.shape[1],
                      vocab_size=vocab, dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0])  # fmt: skip
    return cfg, lora


RWKV6.config_from_state_dict = staticmethod(config_from_state_dict)  # the loader hook of the base

__all__ = ["RWKV6", "LoraDims6", "config_from_state_dict", "default_dim_ffn", "is_rwkv6_state_dict", "reversal_order"]
