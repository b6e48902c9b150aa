"""The RWKV-7 ("x070", Goose) language model: one forward for training, prefill and decoding.

Notable:
- Parameter names are the official RWKV-7 layout (`emb.weight`, `blocks.{i}.att.x_r`, ...,
  `head.weight`), so `state_dict()` is an RWKV-7 World checkpoint and
  `from_checkpoint` loads the released `.pth` files unchanged (dims and LoRA widths are
  read from the tensors; loading is strict).
- `forward(idx | embeds, state, logits="all"|"last"|"hidden")` runs any T >= 1 through the
  chunked WKV kernel (`vrwkv_core.kernels.wkv7`); T == 1 takes a direct fp32 state update
  instead (no kernel padding), which is the decode path. Decoding after a prefill gives
  the logits of one forward over the concatenation.
- The WKV state is always float32; weights and activations may be float32 or bfloat16.
- `grad_checkpoint = True` recomputes each block in backward when training.
- `optimize_for_inference()` tunes the CPU weight layout for decoding (column-major fp32
  matrices, oneDNN-packed bf16 copies); the state dict and the function stay the same.

Time mix per token (see shared/reference/VISUALRWKV_V0700.md, "RWKV-7 time mix"):
log-decay log_w = -exp(-0.5) * sigmoid(z) is evaluated as -exp(-softplus(-z) - 0.5) in
float32, which stays accurate for large |z|; the kernel gets a = -kk, b = kk * a_gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vrwkv_core.config import RWKVSection
from vrwkv_core.errors import CheckpointError
from vrwkv_core.kernels import wkv7
from vrwkv_core.kernels.wkv7 import BACKENDS
from vrwkv_core.model.rwkv.layers import (
    Linear,
    RWKVLanguageModel,
    cpu_step_threads,
    last_row,
    layer_norm,
    linear,
    pack_bf16,
    packed_ok,
    row_vector_weight,
    rowvec_mm,
    rowvec_ok,
    shifted,
)
from vrwkv_core.model.rwkv.state import RWKVState

GROUPNORM_EPS = 64e-5  # RWKV-LM: 1e-5 * head_size_divisor**2 with divisor 8
LORA_ROWS = 64  # decode batches up to this many rows take the row-by-row numpy LoRA route
DECAY_SCALE = -0.6065306597126334  # -exp(-0.5): log_w = DECAY_SCALE * sigmoid(w0 + lora)


@dataclass(frozen=True)
class LoraDims:
    """Widths of the four low-rank projections of the time mix (w1/a1/v1/g1 columns)."""

    decay: int
    aaa: int
    mv: int
    gate: int

    @classmethod
    def default(cls, n_embd: int) -> "LoraDims":
        """RWKV-LM's widths: 64/64/32/128 at C=768, 64/64/32/160 at 1024, 96/96/64/256 at 2048."""
        C = n_embd

        def r32(x: float) -> int:
            return max(32, int(round(x / 32)) * 32)

        return cls(decay=r32(1.8 * C**0.5), aaa=r32(1.8 * C**0.5), mv=r32(1.3 * C**0.5), gate=r32(0.6 * C**0.8))


class TimeMix(nn.Module):
    """RWKV-7 time mix (attention replacement) of one block."""

    def __init__(self, cfg: RWKVSection, layer_id: int, lora: LoraDims) -> None:
        super().__init__()
        C, N = cfg.n_embd, cfg.head_size
        H = C // N
        self.layer_id, self.n_head, self.head_size = layer_id, H, N

        def vec() -> nn.Parameter:
            return nn.Parameter(torch.empty(1, 1, C))

        def mat(rows: int, cols: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(rows, cols))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.w1, self.w2 = vec(), mat(C, lora.decay), mat(lora.decay, C)
        self.a0, self.a1, self.a2 = vec(), mat(C, lora.aaa), mat(lora.aaa, C)
        if layer_id > 0:  # layer 0 defines v_first and has no value-residual mix
            self.v0, self.v1, self.v2 = vec(), mat(C, lora.mv), mat(lora.mv, C)
        self.g1, self.g2 = mat(C, lora.gate), mat(lora.gate, C)
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.output = Linear(C, C)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)
        self._packed: dict[str, tuple[torch.Tensor, int, int]] = {}  # LoRA matrices, see pack_bf16
        self._rowvec: dict[str, tuple] = {}  # fp32 LoRA matrices as numpy views, see row_vector_weight
        # no-grad copies of LoRA matrices as layers of w.T (e.g. fp16-packed, set by quantize):
        # the 94 small matrix-vector products cost ~3x less through a packed kernel than MKL's
        self.lora_fast: dict[str, nn.Module] = {}

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x @ self.<name> (a LoRA matrix [in, out]): decode steps of fp32 rows on one thread go
        row by row through numpy (a layer's eight products: 31 us, 176 us through the fp16-packed
        copies; and a row's bits do not depend on its batch), else through a fast copy where valid."""
        w = self._parameters[name]
        rv = self._rowvec.get(name)
        if rowvec_ok(rv, w, x, rows=LORA_ROWS):
            return rowvec_mm(x, rv)
        fast = self.lora_fast.get(name)
        if fast is not None and not torch.is_grad_enabled():
            return fast.forward(x)
        pk = self._packed.get(name)
        if packed_ok(pk, w, x):
            return torch.ops.mkldnn._linear_pointwise(x, pk[0], None, "none", [], "")
        return x @ w

    @torch.no_grad()
    def optimize_for_inference(self) -> None:
        """Packs the bf16 LoRA matrices (they are [in, out], so the packed weight is w.T); fp32
        ones get numpy views for single-row products."""
        self._packed, self._rowvec = {}, {}
        for name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
            w = self._parameters.get(name)
            pk = pack_bf16(w.t(), w) if w is not None else None
            if pk is not None:
                self._packed[name] = pk
            rv = row_vector_weight(w) if w is not None else None
            if rv is not None:
                self._rowvec[name] = rv

    def forward(
        self,
        x: torch.Tensor,  # [B, T, C], the ln1 output
        shift: torch.Tensor | None,  # [B, C], previous token's x
        wkv_state: torch.Tensor | None,  # [B, H, N, N] fp32
        v_first: torch.Tensor | None,  # [B, T, C], layer 0's v
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output [B,T,C], v_first, new WKV state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = shifted(x, shift) - x
        xr, xw, xk, xv, xa, xg = (
            torch.addcmul(x, xx, m) for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        )
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        lora = self._lora
        w = lora("w2", torch.tanh(lora("w1", xw)))
        a = torch.sigmoid(self.a0 + lora("a2", lora("a1", xa)))
        g = lora("g2", torch.sigmoid(lora("g1", xg)))

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + lora("v2", lora("v1", xv)))
        log_w = -torch.exp(-F.softplus(-(self.w0 + w).float()) - 0.5)  # log of the decay, fp32

        shape = (B, T, H, N)
        y, wkv_state = wkv7(
            r.view(shape), log_w.view(shape), k.view(shape), v.view(shape),
            (-kk).view(shape), (kk * a).view(shape), wkv_state, backend=backend,
        )  # fmt: skip
        y = F.group_norm(y.reshape(B * T, C).to(x.dtype), H, self.ln_x.weight, self.ln_x.bias, GROUPNORM_EPS)
        bonus = (r * k * self.r_k.view(C)).view(B, T, H, N).sum(-1, keepdim=True) * v.view(B, T, H, N)
        y = y.view(B, T, C) + bonus.view(B, T, C)
        return self.output(y * g), v_first, wkv_state

    def step(
        self,
        x: torch.Tensor,  # [B, C], the ln1 output of one token
        shift: torch.Tensor | None,  # [B, C]
        wkv_state: torch.Tensor | None,  # [B, H, N, N] fp32
        v_first: torch.Tensor | None,  # [B, C]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token (the decode path): the same function as `forward` at T=1, written
        with few ops on [B, C] tensors and a direct fp32 state update (no kernel call).

        Decoding is bound by per-op overhead besides weight reads, so this reads parameters
        from `_parameters`/`_modules` (nn.Module.__getattr__ costs ~0.6 us a lookup) and
        uses multiply-sum instead of batched matrix-vector products (~3x faster here).
        """
        B, C = x.shape
        H, N = self.n_head, self.head_size
        P, M = self._parameters, self._modules
        xx = -x if shift is None else shift.to(x.dtype) - x
        maa = torch.cat((P["x_r"], P["x_w"], P["x_k"], P["x_v"], P["x_a"], P["x_g"]))  # [6, 1, C]
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, xx, maa).unbind(0)
        r = linear(M["receptance"], xr)
        k = linear(M["key"], xk)
        v = linear(M["value"], xv)
        lora = self._lora
        # the LoRA products are fresh tensors: their biases go on in place
        w = lora("w2", torch.tanh(lora("w1", xw)))
        a = torch.sigmoid(lora("a2", lora("a1", xa)).add_(P["a0"].view(1, C)))
        g = lora("g2", torch.sigmoid(lora("g1", xg)))
        kk = (k * P["k_k"].view(C)).view(B, H, N)
        kk = kk / torch.linalg.vector_norm(kk, dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize
        k = torch.addcmul(k, k, (a - 1) * P["k_a"].view(C))  # k * (1 + (a - 1) * k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(lora("v2", lora("v1", xv)).add_(P["v0"].view(1, C))))
        # decay = exp(-exp(-0.5) * sigmoid(z)); a single step needs no log-space care
        w = torch.exp(torch.sigmoid(w.add_(P["w0"].view(1, C)).float()) * DECAY_SCALE).view(B, H, 1, N)

        f32 = torch.float32
        r4, k4, v4 = r.view(B, H, 1, N), k.view(B, H, 1, N), v.view(B, H, N, 1)
        kk4, a4 = kk.view(B, H, 1, N), a.view(B, H, 1, N)
        if x.dtype != f32:
            r4, k4, v4, kk4, a4 = (t.to(f32) for t in (r4, k4, v4, kk4, a4))
        S = wkv_state if wkv_state is not None else x.new_zeros(B, H, N, N, dtype=f32)
        sa = (S * kk4).sum(-1, keepdim=True)  # S kk: [B, H, N(v), 1]; the kernel's a = -kk is the -1 below
        # in place on the fresh S * w (autograd-safe: mul does not save its output)
        S = (S * w).addcmul_(sa, kk4 * a4, value=-1.0).addcmul_(v4, k4)
        y = (S * r4).sum(-1).view(B, C).to(x.dtype)

        lnx = M["ln_x"]._parameters
        y = F.group_norm(y, H, lnx["weight"], lnx["bias"], GROUPNORM_EPS).view(B, H, N)
        rk = (r * k * P["r_k"].view(C)).view(B, H, N).sum(-1, keepdim=True)
        y = torch.addcmul(y, rk, v.view(B, H, N)).view(B, C)
        return linear(M["output"], y * g), v_first, S


class ChannelMix(nn.Module):
    """RWKV-7 channel mix (the FFN): value(relu(key(lerp(x, x_prev)))^2)."""

    def __init__(self, cfg: RWKVSection, dim_ffn: int) -> None:
        super().__init__()
        C = cfg.n_embd
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, dim_ffn)
        self.value = Linear(dim_ffn, C)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        k = torch.addcmul(x, shifted(x, shift) - x, self.x_k)
        return self.value(torch.relu(self.key(k)).square())

    def step(self, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """One token: x [B, C]."""
        x_k = self._parameters["x_k"].view(-1)
        k = x * (1 - x_k) if shift is None else torch.lerp(x, shift.to(x.dtype), x_k)  # x + (shift - x) * x_k
        M = self._modules
        return linear(M["value"], torch.relu(linear(M["key"], k)).square())


class Block(nn.Module):
    """ln0 (layer 0 only), then x += att(ln1(x)); x += ffn(ln2(x))."""

    def __init__(self, cfg: RWKVSection, layer_id: int, lora: LoraDims, dim_ffn: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id, lora)
        self.ffn = ChannelMix(cfg, dim_ffn)

    def forward(self, x, v_first, att_shift, wkv_state, ffn_shift, backend: str):
        """Returns (x, v_first, att_shift, wkv_state, ffn_shift) after this block."""
        if self.layer_id == 0:
            x = self.ln0(x)
        h = self.ln1(x)
        dx, v_first, wkv_state = self.att(h, att_shift, wkv_state, v_first, backend)
        att_shift = last_row(h)
        x = x + dx
        h = self.ln2(x)
        x = x + self.ffn(h, ffn_shift)
        return x, v_first, att_shift, wkv_state, last_row(h)

    def step(self, x, v_first, att_shift, wkv_state, ffn_shift):
        """One token, x [B, C]: returns what `forward` returns, with [B, C] tensors."""
        M = self._modules
        if self.layer_id == 0:
            x = layer_norm(M["ln0"], x)
        h = layer_norm(M["ln1"], x)
        dx, v_first, wkv_state = M["att"].step(h, att_shift, wkv_state, v_first)
        x = x + dx
        h2 = layer_norm(M["ln2"], x)
        x = x + M["ffn"].step(h2, ffn_shift)
        return x, v_first, h, wkv_state, h2


class RWKV7(RWKVLanguageModel):
    """RWKV-7 language model; `state_dict()` is the official RWKV-7 layout."""

    version = "x070"
    label = "RWKV-7"
    wkv_backends = BACKENDS

    def __init__(self, cfg: RWKVSection, lora: LoraDims | None = None, *, init: bool = True) -> None:
        """A freshly initialised model (RWKV-LM's RWKV-7 init, see `reset_parameters`).

        `lora` defaults to RWKV-LM's widths for `cfg.n_embd`; `init=False` leaves the
        weights on the meta device (for loaders that assign tensors afterwards).
        """
        super().__init__()
        self._build(cfg, lora or LoraDims.default(cfg.n_embd), cfg.dim_ffn or 4 * cfg.n_embd, Block, init)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-LM's RWKV-7 init (train_temp `RWKV_Tmix_x070` / `RWKV_CMix_x070`, LoRA widths
        of the released files): per-channel token-shift ramps, decay bias w0 from -6 to ~0
        across channels with a per-head zigzag, zero LoRA down-projections and orthogonal
        up-projections scaled 0.1, output and FFN value matrices zero (each block starts as
        the identity), ln_x weight ((i+1)/L)**0.7, embeddings uniform(+-1e-4), and a head
        with std 0.5/sqrt(C) (the entry scale of RWKV-LM's orthogonal head init, without
        a QR of a V x C matrix)."""
        C, N, L = self.n_embd, self.head_size, self.n_layer
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.normal_(self.head.weight, std=0.5 / C**0.5)
        for ln in (self.ln_out, *(m for m in self.modules() if isinstance(m, nn.LayerNorm))):
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)
        n = torch.arange(C, dtype=torch.float64)
        ddd = (n / C).view(1, 1, C)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        for i, block in enumerate(self.blocks):
            att, ffn = block.att, block.ffn
            r01 = i / max(L - 1, 1)
            r10 = 1.0 - i / L
            for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                getattr(att, name).copy_(1.0 - ddd.pow(p * r10))
            decay = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
            att.w0.copy_((decay + 0.5 + zigzag * 2.5).view(1, 1, C))  # +0.5 offsets the softplus
            att.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
            att.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            downs, ups = [att.w1, att.a1, att.g1], [att.w2, att.a2, att.g2]
            if i > 0:
                att.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
                downs.append(att.v1)
                ups.append(att.v2)
            for p in downs:
                nn.init.zeros_(p)
            for p in ups:
                nn.init.orthogonal_(p, gain=0.1)
            bound = C**-0.5
            nn.init.uniform_(att.receptance.weight, -0.5 * bound, 0.5 * bound)
            nn.init.uniform_(att.key.weight, -0.05 * bound, 0.05 * bound)
            nn.init.uniform_(att.value.weight, -0.5 * bound, 0.5 * bound)
            nn.init.zeros_(att.output.weight)
            nn.init.constant_(att.ln_x.weight, ((i + 1) / L) ** 0.7)
            nn.init.zeros_(att.ln_x.bias)
            ffn.x_k.copy_(1.0 - ddd.pow(r10**4))
            nn.init.uniform_(ffn.key.weight, -0.5 * bound, 0.5 * bound)
            nn.init.zeros_(ffn.value.weight)

    def forward(
        self,
        idx: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        state: RWKVState | None = None,
        logits: str = "all",
        backend: str | None = None,
    ) -> tuple[torch.Tensor, RWKVState]:
        """Runs ids [B,T] (or raw embeddings [B,T,C]) from `state` (None: zeros).

        Returns (out, new_state): out is the logits [B,T,V] for logits="all", [B,1,V] for
        "last", or the ln_out output [B,T,C] for "hidden" (apply `self.head` yourself,
        e.g. only where labels are valid). `state` is not modified. `backend` picks the WKV
        kernel (None: `cfg.wkv_backend`, the recipe's `model.rwkv.wkv_backend`).
        """
        x = self._input(idx, embeds, state, logits)
        state = self._start(state, x)  # the learned initial state, if any
        backend = backend or self.cfg.wkv_backend
        one = x.shape[1] == 1  # single token: the step path on [B, C]
        ckpt = self._checkpointing(one)
        if one:
            x = x[:, 0]
        v_first = None
        layers = []
        with cpu_step_threads(x, one, quant=bool(self.quant)):  # one-row fp32 CPU decode: see there
            for i, block in enumerate(self.blocks):
                s = (state.att_shift[i], state.wkv[i], state.ffn_shift[i]) if state is not None else (None, None, None)
                if one:
                    out = block.step(x, v_first, *s)
                elif ckpt:
                    out = checkpoint(block, x, v_first, *s, backend, use_reentrant=False)
                else:
                    out = block(x, v_first, *s, backend)
                x, v_first = out[0], out[1]
                layers.append(out[2:])
            return self._output(x, one, logits, layers)


def config_from_state_dict(
    sd: Mapping[str, torch.Tensor], source: str = "<state dict>"
) -> tuple[RWKVSection, LoraDims]:
    """Dimensions of an official-layout RWKV-7 state dict (no `rwkv.` prefix): n_layer,
    n_embd, head_size (from r_k), vocab_size, dim_ffn and the LoRA widths."""
    need = ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.g1",
            "blocks.0.ffn.key.weight")  # fmt: skip
    missing = [n for n in need if n not in sd]
    if missing:
        hint = None
        if "blocks.0.att.time_decay" in sd or "blocks.0.att.time_maa_x" in sd:
            hint = "this looks like an RWKV-6 (x060) checkpoint"
        elif any(k.startswith("rwkv.") for k in sd):
            hint = "this looks like a VisualRWKV file: load it with VisualRWKV.from_checkpoint"
        raise CheckpointError(f"{source}: not an RWKV-7 checkpoint (missing {', '.join(missing[:3])})", hint=hint)
    vocab, C = sd["emb.weight"].shape
    H, N = sd["blocks.0.att.r_k"].shape
    if H * N != C:
        raise CheckpointError(f"{source}: blocks.0.att.r_k has shape {tuple(sd['blocks.0.att.r_k'].shape)}, "
                              f"which does not factor n_embd {C}")  # fmt: skip
    layers = set()
    for name in sd:
        parts = name.split(".")
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            layers.add(int(parts[1]))
    n_layer = max(layers) + 1
    default = LoraDims.default(C)
    v1 = sd.get("blocks.1.att.v1")
    lora = LoraDims(
        decay=sd["blocks.0.att.w1"].shape[1],
        aaa=sd["blocks.0.att.a1"].shape[1],
        mv=v1.shape[1] if v1 is not None else default.mv,
        gate=sd["blocks.0.att.g1"].shape[1],
    )
    cfg = RWKVSection(version="x070", n_layer=n_layer, n_embd=C, head_size=N, vocab_size=vocab,
                      dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0])  # fmt: skip
    return cfg, lora


RWKV7.config_from_state_dict = staticmethod(config_from_state_dict)  # the loader hook of the base

__all__ = ["RWKV7", "LoraDims", "config_from_state_dict"]
