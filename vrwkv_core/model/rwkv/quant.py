"""Weight-only quantized linear layers: fp16, int8 (per output channel) and int4 (groupwise).

Notable:
- The stored tensors (buffers, hence `state_dict()`) are portable: fp16 `weight16`
  [out, in]; int8 `qweight` int8 [out, in] + bf16 `scales` [out]; int4 `qweight` uint8
  [out, in/2] (two 4-bit values a byte, the even column in the low nibble) + bf16 `scales`
  and `offsets` [out, in/G], with w ~ (q - 8) * scale + offset. Nothing in them depends on
  the CPU or the torch version; `repack()` builds the kernel layout from them.
- CPU decoding goes through torch's own packed kernels: `quantized.linear_dynamic_fp16`
  (fp16 weights, fp32 activations), fbgemm's `quantized.linear_dynamic` for int8 (its
  activations quantized per call; `aten._weight_int8pack_mm` where fbgemm is missing) and
  `aten._weight_int4pack_mm_for_cpu` (bf16 activations). Elsewhere (CUDA, or a torch build
  without them) the weight is dequantized per call: slower, the same function.
- int4 scales are chosen per group to minimise the squared weight error: a grid over
  clipping ratios, then least-squares refits of scale and offset for the chosen codes
  (7% less weight error than plain min/max rounding on Gaussian weights, group 128; more
  on trained weights with outliers). ~0.3 s CPU per million weights: export once for int4.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from vrwkv_core.model.rwkv.layers import Linear, run_on_kernel_threads

FORMATS = ("fp16", "int8", "int4")
INT4_GROUP = 128  # the kernel takes 32, 64, 128 or 256; rows shorter than this use a smaller one
_CLIP_RATIOS = torch.linspace(1.0, 0.7, 7).tolist()
STORED_DTYPES = {"weight16": torch.float16, "scales": torch.bfloat16, "offsets": torch.bfloat16}
# int4's head in int8: far more accurate than int4 and, through fbgemm, faster than fp16
# (65536x768, one thread: int8 3.1 ms, fp16 3.8 ms, int4 2.7 ms)
HEAD_DEFAULT = {"fp16": "fp16", "int8": "int8", "int4": "int8"}
LORA_NAMES = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def int4_group(n_in: int, group: int = INT4_GROUP) -> int | None:
    """The largest kernel group size <= `group` dividing `n_in` (None: int4 does not fit)."""
    for g in (256, 128, 64, 32):
        if g <= group and n_in % g == 0:
            return g
    return None


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [out, in], scales bf16 [out]), w ~ q * scale.

    The scale is the error-minimising one of a few clipping ratios of max|w| per row.
    """
    w = w.float()
    amax = w.abs().amax(1, keepdim=True).clamp_min(1e-12)
    best_err, best_s = None, None
    for r in (1.0, 0.95, 0.9, 0.85, 0.8):
        s = (amax * r / 127).bfloat16().float()
        err = ((w / s).round().clamp(-127, 127) * s - w).square().sum(1, keepdim=True)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    q = (w / best_s).round().clamp(-127, 127).to(torch.int8)
    return q, best_s.view(-1).bfloat16()


def _int4_codes(w: torch.Tensor, s: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    return ((w - off) / s + 8).round().clamp(0, 15)


def quantize_int4(w: torch.Tensor, group: int, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groupwise asymmetric int4: (q uint8 [out, in/2] nibble-packed, scales bf16, offsets bf16
    [out, in/group]), w ~ (q - 8) * scale + offset, with error-minimising scales."""
    out_f, in_f = w.shape
    qs, ss, os_ = [], [], []
    for start in range(0, out_f, rows):  # bounded temporaries on a 65536-row head
        wg = w[start : start + rows].float().reshape(-1, in_f // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        best = None
        for r in _CLIP_RATIOS:
            s = (half * r * 2 / 15).clamp_min(1e-10).bfloat16().float()
            off = (mid - half * r + 8 * s).bfloat16().float()  # code 0 sits at the clipped minimum
            q = _int4_codes(wg, s, off)
            err = ((q - 8) * s + off - wg).square().sum(-1, keepdim=True)
            if best is None:
                best = [err, s, off]
            else:
                m = err < best[0]
                best = [torch.where(m, a, b) for a, b in zip((err, s, off), best)]
        err, s, off = best
        for _ in range(2):  # least squares of w on (q - 8) given the codes, then recode
            q = _int4_codes(wg, s, off) - 8
            qm, wm = q.mean(-1, keepdim=True), wg.mean(-1, keepdim=True)
            var = (q - qm).square().mean(-1, keepdim=True)
            s2 = (((q - qm) * (wg - wm)).mean(-1, keepdim=True) / var.clamp_min(1e-12))
            s2 = torch.where(var > 0, s2, s).clamp_min(1e-10).bfloat16().float()
            off2 = (wm - s2 * qm).bfloat16().float()
            err2 = ((_int4_codes(wg, s2, off2) - 8) * s2 + off2 - wg).square().sum(-1, keepdim=True)
            m = err2 < err
            err, s, off = torch.where(m, err2, err), torch.where(m, s2, s), torch.where(m, off2, off)
        q = _int4_codes(wg, s, off).to(torch.uint8).reshape(-1, in_f)
        qs.append(q[:, 0::2] | (q[:, 1::2] << 4))
        ss.append(s.reshape(-1, in_f // group).bfloat16())
        os_.append(off.reshape(-1, in_f // group).bfloat16())
    return torch.cat(qs), torch.cat(ss), torch.cat(os_)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """Nibble-packed uint8 [out, in/2] -> codes 0..15 int32 [out, in]."""
    return torch.stack((q & 15, q >> 4), -1).reshape(q.shape[0], -1).to(torch.int32)


def _has_op(ns: str, name: str) -> bool:
    return hasattr(getattr(torch.ops, ns), name)


def _int8_fbgemm(q: torch.Tensor, scales: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x @ w.T through fbgemm's dynamic int8 linear: 2.5x faster than `_weight_int8pack_mm`
    here (65536x768, one thread: 3.1 vs 7.8 ms), ~1e-2 relative error per product. None
    where the build has no fbgemm.

    fbgemm quantizes the activations per call with one range for the whole [M, K] input, so a
    row's result would depend on the other rows (eval and serve promise answers that do not
    depend on the batch). Each row is scaled to max |x| = 1 and gets two guard inputs +1, -1
    (against zero weight columns): the range is then [-1, 1] at any batch, and a row gets
    the same bits alone or batched.
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines or not _has_op("quantized", "linear_dynamic"):
        return None
    n_out = q.shape[0]
    guarded = torch.cat((q, q.new_zeros(n_out, 2)), 1)
    with warnings.catch_warnings():  # quantized tensors are deprecated; this packed kernel is not replaced yet
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(guarded, scales.double(), torch.zeros(n_out, dtype=torch.long), 0)
        del guarded  # a copy: let it go before the packed one is made (loading peaks at the head's copies)
        packed = torch.ops.quantized.linear_prepack(qt, None)
        del qt
    # without VNNI, fbgemm's u8 x s8 pair sums saturate at int16: 7-bit activations avoid that
    reduce_range = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    op, guard = torch.ops.quantized.linear_dynamic, torch.tensor([[1.0, -1.0]])

    def int8(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        m = torch.linalg.vector_norm(xf, math.inf, -1, keepdim=True).clamp_min_(1e-30)  # max |x|; a zero row stays zero
        xp = torch.cat((xf / m, guard.expand(xf.shape[0], 2)), -1)
        return (op(xp, packed, reduce_range) * m).to(x.dtype)

    return int8


class QuantLinear(nn.Module):
    """A bias-free linear layer with fp16, int8 or int4 weights (weight-only: activations stay
    in the model's dtype). Build with `from_linear` or, for loading, `empty`."""

    def __init__(self, n_in: int, n_out: int, fmt: str, group: int | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"quantization format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.in_features, self.out_features, self.fmt = n_in, n_out, fmt
        self.group = group if fmt == "int4" else None
        if fmt == "int4" and (group is None or n_in % group):
            raise ValueError(f"int4 needs a group size dividing in_features {n_in}, got {group}")
        self._fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def empty(cls, n_in: int, n_out: int, fmt: str, group: int | None = None, device=None) -> "QuantLinear":
        """A layer with uninitialised storage of the right shapes (a loader fills it, then `repack`)."""
        m = cls(n_in, n_out, fmt, group)
        kw = {"device": device}
        if fmt == "fp16":
            m.register_buffer("weight16", torch.empty(n_out, n_in, dtype=torch.float16, **kw))
        elif fmt == "int8":
            m.register_buffer("qweight", torch.empty(n_out, n_in, dtype=torch.int8, **kw))
            m.register_buffer("scales", torch.empty(n_out, dtype=torch.bfloat16, **kw))
        else:
            m.register_buffer("qweight", torch.empty(n_out, n_in // 2, dtype=torch.uint8, **kw))
            m.register_buffer("scales", torch.empty(n_out, n_in // group, dtype=torch.bfloat16, **kw))
            m.register_buffer("offsets", torch.empty(n_out, n_in // group, dtype=torch.bfloat16, **kw))
        return m

    @classmethod
    @torch.no_grad()
    def from_linear(cls, weight: torch.Tensor, fmt: str, group: int | None = None) -> "QuantLinear":
        """Quantizes a weight [out, in] (any float dtype) and packs it for its device."""
        n_out, n_in = weight.shape
        weight = weight.detach().contiguous()  # optimize_for_inference may have left it column-major
        m = cls(n_in, n_out, fmt, group)
        if fmt == "fp16":
            m.register_buffer("weight16", weight.detach().to(torch.float16).contiguous())
        elif fmt == "int8":
            q, s = quantize_int8(weight.detach())
            m.register_buffer("qweight", q)
            m.register_buffer("scales", s)
        else:
            q, s, off = quantize_int4(weight.detach(), group)
            m.register_buffer("qweight", q)
            m.register_buffer("scales", s)
            m.register_buffer("offsets", off)
        return m.repack()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] these codes stand for (for checks and the non-CPU path)."""
        if self.fmt == "fp16":
            return self.weight16.to(dtype)
        if self.fmt == "int8":
            return (self.qweight.to(dtype) * self.scales.to(dtype)[:, None])
        q = unpack_int4(self.qweight).to(dtype).view(self.out_features, -1, self.group) - 8
        w = q * self.scales.to(dtype)[..., None] + self.offsets.to(dtype)[..., None]
        return w.view(self.out_features, self.in_features)

    @torch.no_grad()
    def repack(self) -> "QuantLinear":
        """Builds the kernel layout for the buffers' device (call after loading or moving)."""
        dev = next(self.buffers()).device
        self._fn = None
        if dev.type == "cpu":
            try:
                self._fn = self._cpu_kernel()
            except (RuntimeError, AttributeError):  # a build without the kernel: dequantize per call
                self._fn = None
        return self

    def _cpu_kernel(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.fmt == "fp16":
            if not _has_op("quantized", "linear_prepack_fp16"):
                return None
            packed = torch.ops.quantized.linear_prepack_fp16(self.weight16.float(), None)
            op = torch.ops.quantized.linear_dynamic_fp16

            def fp16(x: torch.Tensor) -> torch.Tensor:
                return op(x.float(), packed).to(x.dtype)

            return fp16
        if self.fmt == "int8":
            fbgemm = _int8_fbgemm(self.qweight, self.scales)
            if fbgemm is not None:
                return fbgemm
            if not _has_op("aten", "_weight_int8pack_mm"):
                return None
            q, s = self.qweight, self.scales
            op8 = torch.ops.aten._weight_int8pack_mm

            def int8(x: torch.Tensor) -> torch.Tensor:
                return op8(x.to(torch.bfloat16), q, s).to(x.dtype)

            return int8
        if not _has_op("aten", "_convert_weight_to_int4pack_for_cpu"):
            return None
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight), 1)
        sz = torch.stack((self.scales.t(), self.offsets.t()), -1).contiguous()  # [in/G, out, 2]
        op4, G = torch.ops.aten._weight_int4pack_mm_for_cpu, self.group

        def int4(x: torch.Tensor) -> torch.Tensor:
            return op4(x.to(torch.bfloat16), packed, G, sz).to(x.dtype)

        return int4

    def _apply(self, fn, recurse=True):  # .to()/.cuda(): the packed layout follows the buffers
        out = super()._apply(fn, recurse)
        for name, dt in STORED_DTYPES.items():  # model.to(dtype) must not recast the codes' scales
            t = self._buffers.get(name)
            if t is not None and t.dtype != dt and not t.is_meta:
                self._buffers[name] = t.to(dt)
        self.repack()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is not None and x.dim() == 2 and not torch.is_grad_enabled():  # a decode step
            return run_on_kernel_threads(self._fn, x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._fn is not None and not torch.is_grad_enabled():
            y = run_on_kernel_threads(self._fn, x2)
        else:
            y = F.linear(x2, self.dequantized(x.dtype))
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group={self.group}" if self.group else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{g}"


def layer_format(fmt: str, n_in: int) -> tuple[str, int | None]:
    """(format, int4 group) for a matrix with `n_in` inputs: int4 falls back to int8 when no
    kernel group size divides n_in."""
    if fmt != "int4":
        return fmt, None
    group = int4_group(n_in)
    return ("int4", group) if group is not None else ("int8", None)


def _linears(lm: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every plain `Linear` of the LM: the blocks' matrices and the head."""
    return [(p, n, c) for p in lm.modules() for n, c in p._modules.items() if type(c) is Linear]


@torch.no_grad()
def quantize_lm(lm: nn.Module, fmt: str, head: str, lora: bool = True) -> nn.Module:
    """Replaces every `Linear` of an RWKV LM by a QuantLinear in `fmt` (the head in `head`), in
    place; `lora` adds fp16-packed no-grad copies of the RWKV-7 LoRA matrices."""
    for parent, name, child in _linears(lm):
        f, group = layer_format(head if child is lm.head else fmt, child.in_features)
        parent._modules[name] = QuantLinear.from_linear(child.weight, f, group)
    if lora:
        add_lora_fast(lm)
    lm.quant, lm.quant_head = fmt, head
    return lm


def add_lora_fast(lm: nn.Module) -> None:
    """fp16-packed no-grad copies of the RWKV-7 LoRA matrices (CPU, fp32 activations only:
    with bf16 activations the bf16-packed path of `optimize_for_inference` is as fast)."""
    for m in lm.modules():
        fast = getattr(m, "lora_fast", None)
        if fast is None:
            continue
        for name in LORA_NAMES:
            w = m._parameters.get(name)
            if w is not None and w.device.type == "cpu" and w.dtype == torch.float32:
                fast[name] = QuantLinear.from_linear(w.t(), "fp16")


def quantized_layout(lm: nn.Module, shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> str | None:
    """Turns a meta-built LM into the layout of a quantized state dict whose tensor shapes are
    `shapes` (keys: `prefix` + our names): each Linear stored as codes becomes an empty QuantLinear of
    the stored format. Returns the blocks' format (None: nothing stored quantized)."""
    found = None
    for path, parent in lm.named_modules():
        for name, child in list(parent._modules.items()):
            if type(child) is not Linear:
                continue
            key = f"{prefix}{path + '.' if path else ''}{name}."
            if key + "weight16" in shapes:
                f, group = "fp16", None
            elif key + "offsets" in shapes:
                f, group = "int4", child.in_features // max(shapes[key + "offsets"][-1], 1)
            elif key + "qweight" in shapes:
                f, group = "int8", None
            else:
                continue
            parent._modules[name] = QuantLinear.empty(child.in_features, child.out_features, f, group, device="meta")
            if child is lm.head:
                lm.quant_head = f
            elif found is None or f == "int4":
                found = f
    if found is not None:
        lm.quant = found
    return found


QUANT_KEYS = ("qweight", "weight16", "scales", "offsets")


def is_quant_key(name: str) -> bool:
    """Whether a state-dict key is a QuantLinear's stored tensor (kept in its stored dtype)."""
    return name.rsplit(".", 1)[-1] in QUANT_KEYS


def dense_view(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with each quantized layer's tensors replaced by a meta `weight` of the dense shape
    [out, in], so the dims of a quantized state dict can be read like a plain one's."""
    out = {k: t for k, t in sd.items() if not is_quant_key(k)}
    for k, t in sd.items():
        base, leaf = k.rsplit(".", 1)
        if leaf == "weight16" or (leaf == "qweight" and t.dtype == torch.int8):
            out[base + ".weight"] = torch.empty(tuple(t.shape), device="meta")
        elif leaf == "qweight":  # int4: two codes a byte
            out[base + ".weight"] = torch.empty(t.shape[0], t.shape[1] * 2, device="meta")
    return out


def finish_loading(lm: nn.Module) -> None:
    """After a quantized LM's buffers are assigned: the kernel layouts, the LoRA fast path."""
    for m in lm.modules():
        if isinstance(m, QuantLinear):
            m.repack()
    add_lora_fast(lm)


__all__ = ["FORMATS", "HEAD_DEFAULT", "INT4_GROUP", "QuantLinear", "add_lora_fast", "dense_view", "finish_loading", "int4_group", "is_quant_key",
           "layer_format", "quantize_int4", "quantize_int8", "quantize_lm", "quantized_layout", "unpack_int4"]
