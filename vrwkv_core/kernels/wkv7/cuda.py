"""WKV-7 on CUDA: our own kernel in the top-level `cuda_ops/` (installed as `vrwkv_core.cuda_ops`),
JIT-built with torch + ninja.

    y, final_state = wkv7_cuda(r, log_w, k, v, a, b, state=None)

Same contract as `reference.py` (the definition). Per batch and head, S is N x N
(rows index v, columns index k), w_t = exp(log_w_t), and

    S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,    y_t = S_t r_t.

Backward (derived from the recurrence). Let G_t = dL/dS_t, the adjoint of the state
after step t, including the path through y_t; G_T = dL/d(final state) + dy_T r_T^T.
With sa_t = S_{t-1} a_t (saved by the forward) and gb_t = G_t b_t:

    G_t     = G'_t + dy_t r_t^T                (G'_t: what flows back from steps > t)
    dr_t    = S_t^T dy_t                       dv_t = G_t k_t
    dk_t    = G_t^T v_t                        db_t = G_t^T sa_t
    dw_t    = diag(G_t^T S_{t-1})              (dlog_w_t = w_t * dw_t)
    da_t    = S_{t-1}^T gb_t
    G'_{t-1} = G_t diag(w_t) + gb_t a_t^T      (dL/d(initial state) = G'_0)

The forward keeps row i of S in thread i's registers and, when a gradient is needed,
writes S every C steps (chunk length) and sa_t. The backward walks the chunks in reverse;
thread j holds column j of S and of G (for the reductions over i: dr, dk, db, dw, da) and
row j of G (for the reductions over the column index: dv, gb). It rebuilds S_{t-1} from
S_t by inverting the step, S_{t-1} = (S_t - v_t k_t^T - sa_t b_t^T) diag(1/w_t), at most C
steps from a checkpoint; with w >= exp(-exp(-0.5)) ~ 0.55 in the model this bounds the
rounding growth (C = 16: relative gradient errors ~1e-6 to 1e-5 in float32).

The extension is built on first use from the installed package's sources, one build per
head size, chunk length and element type (bf16 or fp32; fp16 and fp64 inputs run in fp32),
cached under $VRWKV_CACHE_DIR/extensions (see vrwkv_core/paths.py). Set VRWKV_KERNEL_DEBUG=1
(or `POISON_OUTPUTS = True`) to allocate every output NaN-filled, so an element the kernel
forgets to write shows up in tests.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vrwkv_core.errors import VrwkvError
from vrwkv_core.kernels.common import check_inputs
from vrwkv_core.paths import extensions_dir

SUPPORTED_HEAD_SIZES = (64,)
DEFAULT_CHUNK_LEN = 16
MAX_CHUNK_LEN = 16  # the backward's shared-memory tiles (9 x C x N floats) must fit in 48 KB
POISON_OUTPUTS = os.environ.get("VRWKV_KERNEL_DEBUG", "") not in ("", "0")

_SOURCES = ("wkv7.h", "wkv7.cu", "wkv7_op.cpp")
_FALLBACK_CUDA_HOMES = ("/usr/local/cuda",)
_CFLAGS = ("-O3",)
_CUDA_CFLAGS = ("-O3", "-Xptxas=-O3")
_DTYPE_TAGS = {torch.bfloat16: "bf16", torch.float32: "fp32"}
_OPS: dict[tuple[int, int, torch.dtype], Any] = {}
_AVAILABLE: dict[int, bool] = {}
_REASONS: dict[int, str] = {}
_LOCK = threading.Lock()


class KernelUnavailable(VrwkvError):
    """The CUDA kernel cannot be built or run here (no GPU, no nvcc, no ninja, compile error)."""


def _cuda_home() -> str:
    """A CUDA toolkit root with bin/nvcc and include/cuda_runtime.h.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc gives /usr/local), so each candidate is checked.
    """
    import torch.utils.cpp_extension as cpp_ext

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_ext.CUDA_HOME, *_FALLBACK_CUDA_HOMES]
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    raise KernelUnavailable(
        "nvcc not found: no CUDA toolkit at CUDA_HOME, CUDA_PATH or /usr/local/cuda",
        hint="install the CUDA toolkit matching torch.version.cuda and set CUDA_HOME to it",
    )


def _cache_root() -> Path:
    # torch's own version in the path: a build must not be reused across torch ABIs.
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = f"{py}_torch{torch.__version__.split('+')[0]}_cu{torch.version.cuda}"
    return extensions_dir() / tag


def _check_config(head_size: int, chunk_len: int, dtype: torch.dtype) -> None:
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise KernelUnavailable(f"the CUDA WKV-7 kernel supports head size {SUPPORTED_HEAD_SIZES}, not {head_size}")
    if not 1 <= chunk_len <= MAX_CHUNK_LEN:
        raise KernelUnavailable(f"chunk_len must be in [1, {MAX_CHUNK_LEN}], got {chunk_len}")
    if dtype not in _DTYPE_TAGS:
        raise KernelUnavailable(f"the CUDA WKV-7 kernel is built for bfloat16 or float32, not {dtype}")


def _check_toolchain() -> str:
    """Raise a one-line KernelUnavailable for a missing piece; return the CUDA toolkit root."""
    import torch.utils.cpp_extension as cpp_ext

    if torch.version.cuda is None:
        raise KernelUnavailable("this torch build has no CUDA support", hint="install a CUDA build of torch")
    if not cpp_ext.is_ninja_available():
        raise KernelUnavailable("ninja not found: the CUDA kernel is built with ninja", hint="pip install ninja")
    home = _cuda_home()
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        raise KernelUnavailable(
            "no CUDA device to build for", hint="set TORCH_CUDA_ARCH_LIST (e.g. 9.0) to build without a GPU"
        )
    return home


def build(
    head_size: int = 64, chunk_len: int = DEFAULT_CHUNK_LEN, dtype: torch.dtype = torch.bfloat16, verbose: bool = False
) -> Any:
    """Build (or load from the cache) the extension; returns its op namespace (`.forward`, `.backward`).

    Needs nvcc, ninja and either a CUDA device or TORCH_CUDA_ARCH_LIST. Raises KernelUnavailable.
    """
    _check_config(head_size, chunk_len, dtype)
    key = (head_size, chunk_len, dtype)
    with _LOCK:
        if key in _OPS:
            return _OPS[key]
        home = _check_toolchain()
        import torch.utils.cpp_extension as cpp_ext

        if cpp_ext.CUDA_HOME != home:
            cpp_ext.CUDA_HOME = home  # torch reads this module global to find nvcc and the headers
        with resources.as_file(resources.files("vrwkv_core.cuda_ops")) as src:
            name, defines = _build_name(head_size, chunk_len, dtype)
            build_dir = _cache_root() / name
            build_dir.mkdir(parents=True, exist_ok=True)
            try:
                cpp_ext.load(
                    name=name,
                    sources=[str(src / "wkv7_op.cpp"), str(src / "wkv7.cu")],
                    extra_cflags=[*_CFLAGS, *defines],
                    extra_cuda_cflags=[*_CUDA_CFLAGS, *defines],
                    extra_include_paths=[str(src)],
                    build_directory=str(build_dir),
                    is_python_module=False,
                    verbose=verbose,
                )
            except Exception as err:  # torch raises RuntimeError / OSError with the compiler output
                log = build_dir / "last_error.log"
                log.write_text(str(err))
                lines = str(err).splitlines()  # the compiler's own "file(12): error: ..." line, if any
                first = next((ln.strip() for ln in lines if "error:" in ln), lines[0][:200] if lines else repr(err))
                raise KernelUnavailable(
                    f"building the CUDA WKV-7 kernel {name} failed: {first}", hint=f"full compiler output: {log}"
                ) from err
        ops = getattr(torch.ops, name)
        _OPS[key] = ops
        return ops


def build_directory(
    head_size: int = 64, chunk_len: int = DEFAULT_CHUNK_LEN, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Where `build` caches this configuration (the folder may not exist yet)."""
    _check_config(head_size, chunk_len, dtype)
    return _cache_root() / _build_name(head_size, chunk_len, dtype)[0]


def _build_name(head_size: int, chunk_len: int, dtype: torch.dtype) -> tuple[str, list[str]]:
    """The extension's name (also its op namespace) and its -D flags; the name changes with the sources."""
    src = resources.files("vrwkv_core.cuda_ops")
    digest = hashlib.sha256(repr((_CFLAGS, _CUDA_CFLAGS)).encode())
    for f in _SOURCES:
        digest.update((src / f).read_bytes())
    name = f"vrwkv_wkv7_{_DTYPE_TAGS[dtype]}_n{head_size}_c{chunk_len}_{digest.hexdigest()[:10]}"
    defines = [f"-DVRWKV_BF16={int(dtype == torch.bfloat16)}", f"-DVRWKV_N={head_size}", f"-DVRWKV_C={chunk_len}"]
    return name, [*defines, f"-DVRWKV_NS={name}"]


def is_available(head_size: int = 64) -> bool:
    """True when a CUDA device is present and the kernel builds for this head size (cached; never raises)."""
    if head_size in _AVAILABLE:
        return _AVAILABLE[head_size]
    ok, reason = False, ""
    try:
        if not torch.cuda.is_available():
            reason = "no CUDA device"
        else:
            build(head_size)
            ok = True
    except Exception as err:  # noqa: BLE001 - any failure means "use another backend"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    _AVAILABLE[head_size], _REASONS[head_size] = ok, reason
    return ok


def sources_status() -> str:
    """Where the installed package keeps the kernel sources, or what is missing (for `vrwkv env`)."""
    src = resources.files("vrwkv_core.cuda_ops")
    missing = [f for f in _SOURCES if not (src / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)} in {src}"
    return f"{src} ({', '.join(_SOURCES)})"


def build_status(head_size: int = 64) -> str:
    """One line for `vrwkv env`: 'builds (sm_90, cached at ...)' or 'not available: <reason>'."""
    if not is_available(head_size):
        return f"not available: {_REASONS.get(head_size, 'unknown reason')}"
    major, minor = torch.cuda.get_device_capability()
    return f"builds (sm_{major}{minor}, cached at {build_directory(head_size)})"


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned: the kernels read states with float4 loads."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, chunk_len, save, r, log_w, k, v, a, b, s0):  # type: ignore[override]
        B, T, H, N = r.shape
        y = _alloc(r.shape, r.dtype, r.device)
        s_final = _alloc((B, H, N, N), torch.float32, r.device)
        ckpt = sa = None
        if save:
            nchunks = (T + chunk_len - 1) // chunk_len
            ckpt = _alloc((B * H, nchunks, N, N), torch.float32, r.device)
            sa = _alloc(r.shape, torch.float32, r.device)
        ops.forward(r, log_w, k, v, a, b, s0, y, s_final, ckpt, sa)
        if save:
            ctx.save_for_backward(r, log_w, k, v, a, b, ckpt, sa)
            ctx.ops, ctx.has_state = ops, s0 is not None
        ctx.set_materialize_grads(False)
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):  # type: ignore[override]
        r, log_w, k, v, a, b, ckpt, sa = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        if ds_final is not None:
            ds_final = _aligned(ds_final.float())
        grads = [_alloc(r.shape, r.dtype, r.device) for _ in range(6)]
        ds0 = _alloc((B, H, N, N), torch.float32, r.device)
        ctx.ops.backward(r, log_w, k, v, a, b, dy, ds_final, ckpt, sa, not ctx.has_state, *grads, ds0)
        return (None, None, None, *grads, ds0 if ctx.has_state else None)


def wkv7_cuda(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
              state: Tensor | None = None, chunk_len: int = DEFAULT_CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """WKV-7 with the CUDA kernel: inputs [B,T,H,N] on one GPU -> (y in the input dtype, final fp32 state)."""
    xs = (r, log_w, k, v, a, b)
    B, T, H, N = check_inputs(xs, state)
    if not all(x.is_cuda and x.device == r.device for x in xs):
        raise ValueError("wkv7 backend 'cuda' needs all inputs on one CUDA device")
    out_dtype = functools.reduce(torch.promote_types, [x.dtype for x in xs])
    dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
    s0 = None if state is None else _aligned(state.to(device=r.device, dtype=torch.float32))
    if T == 0:
        s = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device) if s0 is None else s0.clone()
        return r.new_empty(r.shape, dtype=out_dtype), s
    ops = build(N, chunk_len, dtype)
    y, s_final = _apply(ops, chunk_len, tuple(x.to(dtype).contiguous() for x in xs), s0)
    return y.to(out_dtype), s_final


def _apply(
    ops: Any, chunk_len: int, xs: tuple[torch.Tensor, ...], s0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the op pair `ops` (a build, or a stand-in in tests) under autograd on prepared inputs."""
    # Checkpoints are only worth their memory when a graph is being recorded.
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (*xs, s0) if t is not None)
    return _WKV7.apply(ops, chunk_len, save, *xs, s0)
