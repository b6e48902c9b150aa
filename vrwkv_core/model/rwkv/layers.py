"""What the RWKV language models (RWKV-7, RWKV-6) share: fast linear layers, token shift, and a
base class holding the layout (emb, blocks, ln_out, head), forward input checks and output,
zero state and the CPU inference layout. Each family keeps its blocks, init and block loop;
reading and writing weight files is `vrwkv_core.checkpoint`'s job (the base's `from_checkpoint`
and `save` hand over to it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from vrwkv_core.model.rwkv.state import RWKVState

LOGITS_MODES = ("all", "last", "hidden")


class Linear(nn.Linear):
    """A bias-free nn.Linear whose CPU layout `RWKV7.optimize_for_inference` can tune."""

    _packed: tuple[torch.Tensor, int, int] | None = None  # see pack_bf16
    _packed_rows: tuple[torch.Tensor, int, int] | None = None  # see pack_batched
    _rowvec: tuple[Any, int] | None = None  # see row_vector_weight

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x)

    @torch.no_grad()
    def optimize_for_inference(self) -> None:
        """fp32 CPU: column-major weight storage; bf16 CPU: a oneDNN-packed copy."""
        w = self.weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
            # MKL's M=1 gemm streams an [in, out] matrix ~1.6x faster than [out, in] (the
            # `rwkv` package stores its matrices transposed for this); the parameter keeps
            # its shape, only its strides change.
            self.weight.data = w.t().contiguous().t()
            self._rowvec = row_vector_weight(self.weight.t())
        self._packed = pack_bf16(w, w)

    @torch.no_grad()
    def pack_batched(self) -> None:
        """An fp32 oneDNN-packed copy for no-grad steps of several rows ([B, C], B >= 2): 2-2.5x
        faster than MKL at B=8 here; see `RWKVLanguageModel.use_batched_route`."""
        w = self.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 8)
        self._packed_rows = (packed, w._version, w.data_ptr())


def row_vector_weight(w_in_out: torch.Tensor) -> tuple[Any, int] | None:
    """A numpy view [in, out] (no copy) of a contiguous fp32 CPU weight, for single-row
    products when torch runs one thread: numpy's bundled OpenBLAS does x @ W 1.4-1.9x faster
    than torch's MKL for the 0.1B shapes here (768x768: 29 vs 51 us; the head 7.1 vs 9.8 ms).
    With both pools busy they fight over the cores (4.5x slower decoding on 2 threads here), so
    `rowvec_ok` takes this route only while torch runs one thread (see `cpu_step_threads`).
    Tagged with the storage pointer: a weight replaced by loading or `.to()` is never read
    through it."""
    if w_in_out.device.type != "cpu" or w_in_out.dtype != torch.float32 or not w_in_out.is_contiguous():
        return None
    return w_in_out.detach().numpy(), w_in_out.data_ptr()


_blas_threads = 0  # OpenBLAS's thread count as we last set it (0: not yet)
_step_blas_threads = 1  # what a numpy product gets: 1, or the caller's torch threads in `cpu_step_threads`
_kernel_threads = 0  # torch threads of a quantized kernel in a `cpu_step_threads` step (0: as they are)


def _one_thread() -> bool:
    """torch runs one thread; numpy's OpenBLAS is then set to `_step_blas_threads` (1 unless a
    `cpu_step_threads` step runs; its default is one thread per core, which on a busy machine
    makes the small products of a batch-of-rows decode 30x slower)."""
    global _blas_threads
    if torch.get_num_threads() != 1:
        return False
    if _blas_threads != _step_blas_threads:
        threadpool_limits(limits=_step_blas_threads, user_api="blas")  # ~12 us: only on a change
        _blas_threads = _step_blas_threads
    return True


@contextlib.contextmanager
def cpu_step_threads(x: torch.Tensor, one: bool, quant: bool = False) -> Iterator[None]:
    """A one-row fp32 CPU decode step (`one`: T == 1) with torch on N > 1 threads runs its small
    ops on one thread (their OpenMP regions cost more than they save) and its matrix products on
    N: fp32 matrices through numpy's OpenBLAS on N threads (0.1B shape, 2 quiet cores: 31-32 ms a
    token, against 36-41 on one thread and 41-49 through MKL on two), quantized ones (`quant`) through torch's
    kernels on N threads (`run_on_kernel_threads`, the LoRA products' fp16 copies too, as with
    several rows: a row's logits stay the same bits alone or in a batch). Only one pool works at
    a time, so the pools do not fight (see `row_vector_weight`)."""
    global _step_blas_threads, _kernel_threads
    n = torch.get_num_threads()
    if not one or n == 1 or x.shape[0] != 1 or x.dtype != torch.float32 or x.device.type != "cpu" \
            or torch.is_grad_enabled():  # fmt: skip
        yield
        return
    torch.set_num_threads(1)  # ~0.1 us
    if quant:
        _kernel_threads = n
    else:
        _step_blas_threads = n
    try:
        yield
    finally:
        _step_blas_threads, _kernel_threads = 1, 0
        torch.set_num_threads(n)


def run_on_kernel_threads(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) with torch on the caller's threads inside a quantized `cpu_step_threads` step."""
    n = _kernel_threads
    if not n:
        return fn(x)
    torch.set_num_threads(n)
    try:
        return fn(x)
    finally:
        torch.set_num_threads(1)


def rowvec_ok(rv: tuple[Any, int] | None, w: torch.Tensor, x: torch.Tensor, rows: int = 1) -> bool:
    """Whether `x` is at most `rows` fp32 rows, no-grad, torch runs one thread (not in a quantized
    `cpu_step_threads` step: its LoRA products take the path of several rows), and `rv` still views `w`."""
    return (
        rv is not None and x.numel() <= rows * x.shape[-1] and x.dtype == torch.float32 and rv[1] == w.data_ptr()
        and not torch.is_grad_enabled() and not _kernel_threads and _one_thread()
    )  # fmt: skip


def rowvec_mm(x: torch.Tensor, rv: tuple[Any, int]) -> torch.Tensor:
    """x [..., in] @ W [in, out] through numpy, one row at a time: a row gets the same bits
    alone or among others (a several-row product may round differently)."""
    flat, w = x.dim() == 2, rv[0]  # [B, in], a decode step: no reshapes (~1 us each, 170 a token)
    xn = x.numpy() if flat else x.reshape(-1, x.shape[-1]).numpy()
    y = torch.from_numpy(xn @ w if len(xn) == 1 else np.concatenate([xn[i : i + 1] @ w for i in range(len(xn))]))
    return y if flat else y.view(*x.shape[:-1], w.shape[1])


def pack_bf16(w_out_in: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """A oneDNN-packed copy of a bf16 CPU weight [out, in] for no-grad matmuls (torch's own
    bf16 gemv is ~2x slower), tagged with `source`'s storage and version counter so that a
    weight changed by training or loading is never read through a stale copy."""
    if source.dtype != torch.bfloat16 or source.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w_out_in.detach().contiguous(), 1)
    except (RuntimeError, AttributeError):  # a oneDNN build without bf16 support
        return None
    return packed, source._version, source.data_ptr()


def packed_ok(pk: tuple[torch.Tensor, int, int] | None, w: torch.Tensor, x: torch.Tensor) -> bool:
    return (
        pk is not None and x.dtype == torch.bfloat16 and pk[1] == w._version and pk[2] == w.data_ptr()
        and not torch.is_grad_enabled()
    )  # fmt: skip


def linear(m: Linear, x: torch.Tensor) -> torch.Tensor:
    """m(x) without nn.Module call overhead; through m's packed bf16 copy where valid, or through
    m's own forward for a layer without its own `weight` (a quantized one, or one a `peft` adapter
    wraps: its forward adds the adapter to the base layer's)."""
    w = m._parameters.get("weight")
    if w is None:
        return m.forward(x)  # not m(x): nn.Module.__call__ costs ~3 us a call, 85 calls a token
    if packed_ok(m._packed, w, x):
        return torch.ops.mkldnn._linear_pointwise(x, m._packed[0], None, "none", [], "")
    if rowvec_ok(m._rowvec, w, x):
        return rowvec_mm(x, m._rowvec)
    rows = m._packed_rows
    if rows is not None and 1 < x.numel() // x.shape[-1] <= 64 and rows[1] == w._version and rows[2] == w.data_ptr() \
            and x.dtype == torch.float32 and not torch.is_grad_enabled():  # fmt: skip (decode steps, not prefill)
        return torch.ops.mkldnn._linear_pointwise(x, rows[0], None, "none", [], "")
    return F.linear(x, w)


def shifted(x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """x delayed by one token along T, with `shift` (or zeros) as the token before the first."""
    prev = torch.zeros_like(x[:, :1]) if shift is None else shift.to(x.dtype).unsqueeze(1)
    if x.shape[1] == 1:
        return prev
    return torch.cat((prev, x[:, :-1]), dim=1)


def layer_norm(m: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """m(x) without nn.Module call overhead."""
    return F.layer_norm(x, m.normalized_shape, m._parameters["weight"], m._parameters["bias"], m.eps)


def last_row(h: torch.Tensor) -> torch.Tensor:
    """h[:, -1] as its own small tensor, so a kept state does not pin the whole [B,T,C] h."""
    return h[:, -1] if h.shape[1] == 1 else h[:, -1].clone()


class RWKVLanguageModel(nn.Module):
    """Base of RWKV7 and RWKV6: subclasses set `version`, `label` and `config_from_state_dict`,
    build their blocks through `_build` and run them between `_input` and `_output`."""

    version = ""
    label = ""
    wkv_backends: tuple[str, ...] = ()
    batched_route = False  # see use_batched_route
    quant: str | None = None  # the blocks' weight format once quantized (vrwkv_core.model.rwkv.quant)

    def _build(self, cfg: Any, lora: Any, dim_ffn: int, make_block: Any, init: bool) -> None:
        """The layout both share: emb, blocks, ln_out, head, built on the meta device, then
        materialised and initialised on the default device unless `init` is False."""
        if cfg.version != self.version:
            raise ValueError(f"{type(self).__name__} needs model.rwkv.version {self.version}, got {cfg.version!r}")
        if cfg.n_embd % cfg.head_size:
            raise ValueError(f"n_embd {cfg.n_embd} is not a multiple of head_size {cfg.head_size}")
        if cfg.wkv_backend not in self.wkv_backends:
            raise ValueError(f"model.rwkv.wkv_backend: the {self.label} WKV op has no backend {cfg.wkv_backend!r}; "
                             f"choose from {', '.join(self.wkv_backends)}")  # fmt: skip
        self.cfg = replace(cfg, dim_ffn=dim_ffn)
        self.lora = lora
        self.n_layer, self.n_embd, self.head_size = cfg.n_layer, cfg.n_embd, cfg.head_size
        self.vocab_size, self.dim_ffn = cfg.vocab_size, dim_ffn
        self.grad_checkpoint = False
        self.register_parameter("state_wkv", None)  # the learned initial WKV state [L,H,N,N] (state tuning)
        with torch.device("meta"):
            # An explicit weight skips nn.Embedding's normal_ init: normal_ on the meta device
            # imports torch._dynamo, ~1 s added to every model build.
            self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.empty(cfg.vocab_size, cfg.n_embd))
            self.blocks = nn.ModuleList(make_block(self.cfg, i, lora, dim_ffn) for i in range(cfg.n_layer))
            self.ln_out = nn.LayerNorm(cfg.n_embd)
            self.head = Linear(cfg.n_embd, cfg.vocab_size)
        device = torch.get_default_device()
        if init and device.type != "meta":
            self.to_empty(device=device)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def _input(self, idx: torch.Tensor | None, embeds: torch.Tensor | None, state: Any, logits: str) -> torch.Tensor:
        """Checks the forward arguments and returns the input embeddings [B,T,C]."""
        if (idx is None) == (embeds is None):
            raise ValueError("pass exactly one of idx [B,T] or embeds [B,T,C]")
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be one of {', '.join(LOGITS_MODES)}, got {logits!r}")
        x = self.emb(idx) if idx is not None else embeds.to(self.emb.weight.dtype)
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"expected ids [B,T] or embeds [B,T,{self.n_embd}], got {tuple(x.shape)}")
        if state is not None and (state.batch_size != x.shape[0] or state.n_layer != self.n_layer):
            raise ValueError(
                f"state has batch {state.batch_size} and {state.n_layer} layers; input has batch "
                f"{x.shape[0]}, model {self.n_layer} layers"
            )
        return x

    def _checkpointing(self, one: bool) -> bool:
        """Whether blocks recompute their activations in backward (training, T > 1)."""
        return self.grad_checkpoint and self.training and torch.is_grad_enabled() and not one

    def _output(self, x: torch.Tensor, one: bool, logits: str, layers: list[tuple]) -> tuple[torch.Tensor, Any]:
        """ln_out + head on the blocks' output (x [B,C] when `one`), and the new state from the
        per-layer (att_shift, wkv, ffn_shift) triples."""
        new_state = RWKVState(*(list(parts) for parts in zip(*layers)))
        if one:
            x = x.unsqueeze(1)
        if logits == "last":
            x = x[:, -1:]
        x = self.ln_out(x)
        if logits == "hidden":
            return x, new_state
        return self.head(x), new_state

    @staticmethod
    def config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> tuple[Any, Any]:
        raise NotImplementedError

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        source: str = "<state dict>",
    ) -> Any:
        """A model holding exactly the tensors of an official-layout state dict (strict).

        dtype None: bfloat16 on CUDA, float32 elsewhere. Tensors already in the target
        dtype and device are used as they are (no copy, so an mmap'd file stays mapped).
        """
        from vrwkv_core.checkpoint.build import lm_from_state_dict  # the one way into checkpoint/

        return lm_from_state_dict(cls, sd, source, device, dtype)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Any:
        """Loads an official RWKV World `.pth` (any float dtype) or a `.safetensors` from `save`."""
        from vrwkv_core.checkpoint.load import load_lm  # the one way into checkpoint/

        return load_lm(cls, path, device, dtype)

    def save(self, path: str | Path) -> None:
        """Writes the weights as safetensors in the official layout (atomic), dims in metadata."""
        from vrwkv_core.checkpoint.ours import save_lm  # the one way into checkpoint/

        save_lm(self, path)

    def enable_state_tuning(self) -> nn.Parameter:
        """Adds a trainable initial WKV state [L, H, N, N] (float32, zeros: the model is unchanged
        until it trains); forwards without a `state` start from it. Returns the parameter."""
        H = self.n_embd // self.head_size
        p = next(self.parameters())
        zeros = torch.zeros(self.n_layer, H, self.head_size, self.head_size, device=p.device, dtype=torch.float32)
        self.state_wkv = nn.Parameter(zeros)
        return self.state_wkv

    def set_initial_state(self, state: RWKVState | None) -> None:
        """Forwards without a `state` start from `state` (batch 1: a state-tuning file) instead of
        zeros; None goes back to zeros. Only the WKV part is used: a learned state has no shifts."""
        if state is None:
            self.state_wkv = None
            return
        H, N = self.n_embd // self.head_size, self.head_size
        if state.n_layer != self.n_layer or tuple(state.wkv[0].shape) != (1, H, N, N):
            raise ValueError(f"the state has {state.n_layer} layers of WKV shape {tuple(state.wkv[0].shape)}; "
                             f"this model needs {self.n_layer} layers of (1, {H}, {N}, {N})")  # fmt: skip
        if any(bool(t.any()) for t in (*state.att_shift, *state.ffn_shift)):
            raise ValueError("the state has non-zero token shifts: it is a conversation's state, not an initial one")
        wkv = torch.cat(state.wkv).to(device=self.emb.weight.device, dtype=torch.float32)
        self.state_wkv = nn.Parameter(wkv, requires_grad=False)

    def initial_state(self) -> RWKVState | None:
        """The learned initial state (batch 1, zero shifts) as an RWKVState; None without one."""
        if self.state_wkv is None:
            return None
        st = RWKVState.zeros(self, 1)
        st.wkv = [w.detach().unsqueeze(0).clone() for w in self.state_wkv]
        return st

    def _start(self, state: Any, x: torch.Tensor) -> Any:
        """The state a forward starts from: the caller's, else the learned initial state
        (expanded to the batch, differentiable), else None (zeros)."""
        if state is not None or self.state_wkv is None:
            return state
        return self.start_state(x.shape[0], x)

    def start_state(self, batch: int, like: torch.Tensor) -> RWKVState:
        """The state a forward given none starts from, spelled out for `batch` rows: zero shifts
        in `like`'s dtype and device, and the learned initial WKV state (expanded,
        differentiable) or zeros. Lets rows that start fresh share one call with rows that
        continue a state (train.branching)."""
        if self.state_wkv is None:
            return RWKVState.zeros(self, batch, device=like.device, dtype=like.dtype)
        shifts = [torch.zeros(batch, self.n_embd, device=like.device, dtype=like.dtype) for _ in range(self.n_layer)]
        wkv = [w.unsqueeze(0).expand(batch, -1, -1, -1) for w in self.state_wkv.unbind(0)]
        return RWKVState(shifts, wkv, list(shifts))

    def zero_state(self, batch: int = 1) -> Any:
        """An all-zero state on the model's device (same as passing state=None)."""
        return RWKVState.zeros(self, batch)

    def use_wkv_backend(self, backend: str) -> Any:
        """Runs the WKV op through `backend` from now on (returns self); ValueError for a name
        this family's op does not have (`wkv_backends`)."""
        if backend not in self.wkv_backends:
            raise ValueError(f"the {self.label} WKV op has no backend {backend!r}; choose from {', '.join(self.wkv_backends)}")
        self.cfg = replace(self.cfg, wkv_backend=backend)
        return self

    def use_batched_route(self) -> Any:
        """Single-token steps of fp32 rows go through oneDNN-packed copies of the matrices (~2x
        faster at batch 8 on CPU; one more fp32 copy of them in memory). With it a row's logits
        are the same bits in any batch of 2 to 16 rows (measured on the 0.1B shape), and
        `decode_step` runs a lone row as two, so answers do not depend on the batch at all;
        MKL's default route rounds batches of 1-3 rows differently from larger ones (~1e-5).
        Returns self."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for m in linears:
            m.pack_batched()
        self.batched_route = any(m._packed_rows is not None for m in linears)  # CPU fp32 only
        return self

    def optimize_for_inference(self) -> Any:
        """Lays the matrices out for fast CPU decoding (returns self).

        fp32: the big matrices become column-major (same values and shapes, transposed
        storage), which makes single-token gemv ~1.3x faster and prefill matmuls ~10%
        slower. bf16: each big matrix gets a oneDNN-packed copy (one more bf16 copy of
        the weights in memory) that no-grad forwards use. Training afterwards still works.
        """
        for m in self.modules():
            if m is not self and callable(getattr(m, "optimize_for_inference", None)):
                m.optimize_for_inference()
        return self
