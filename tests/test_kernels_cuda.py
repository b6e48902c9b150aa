"""The CUDA WKV-7 kernel: it compiles here (nvcc, no GPU needed), and on a GPU it matches
the float64 reference in the forward, the final state and every gradient.

Without a GPU two more checks run: the kernel source itself, compiled by g++ with a small
shim (one std::thread per CUDA lane, std::barrier for __syncthreads, static locals for
shared memory), against the reference; and the autograd wrapper over a plain-PyTorch
stand-in for the two ops, which checks the backward equations written in kernels/wkv7/cuda.py.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vrwkv_core.kernels.wkv7 import cuda
from vrwkv_core.kernels.wkv7.reference import wkv7_reference


def make_inputs(B, T, H, N=64, dtype=torch.float32, device="cpu", seed=0, state=True):
    """Inputs in the model's ranges: log_w in (-exp(-0.5), 0), a = -kk, b = kk * gate."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    log_w = -torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * torch.sigmoid(rnd(B, T, H, N))
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rnd(B, T, H, N))
    s0 = rnd(B, H, N, N) if state else None
    dy, ds = rnd(B, T, H, N), rnd(B, H, N, N)
    xs = [x.to(device=device, dtype=dtype) for x in (r, log_w, k, v, a, b)]
    s0 = None if s0 is None else s0.to(device=device, dtype=torch.float32)
    return xs, s0, dy.to(device=device, dtype=dtype), ds.to(device=device, dtype=torch.float32)


def reference_grads(xs, s0, dy, ds):
    """y, final state and the gradients of sum(y*dy) + sum(S_T*ds), all in float64."""
    ins = [x.detach().double().requires_grad_() for x in xs]
    st = None if s0 is None else s0.detach().double().requires_grad_()
    y, s = wkv7_reference(*ins, st)
    ((y * dy.double()).sum() + (s * ds.double()).sum()).backward()
    grads = [x.grad for x in ins] + ([st.grad] if st is not None else [])
    return y.detach(), s.detach(), grads


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite output (an element the kernel did not write?)"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# --- a plain-PyTorch stand-in for the extension's ops (same buffers, same algorithm) ---


class EmulatedOps:
    """forward/backward with the extension's signatures, in float64, for CPU tests of the wrapper."""

    def __init__(self, chunk_len):
        self.C = chunk_len

    def forward(self, r, log_w, k, v, a, b, s0, y, sT, ckpt, sa):
        B, T, H, N = r.shape
        r, w, k, v, a, b = (x.double() for x in (r, log_w.double().exp(), k, v, a, b))
        S = torch.zeros(B, H, N, N, dtype=torch.float64) if s0 is None else s0.double()
        for t in range(T):
            sat = torch.einsum("bhij,bhj->bhi", S, a[:, t])
            S = S * w[:, t, :, None, :] + sat[..., None] * b[:, t, :, None, :]
            S = S + v[:, t, ..., None] * k[:, t, :, None, :]
            y[:, t] = torch.einsum("bhij,bhj->bhi", S, r[:, t]).to(y.dtype)
            if ckpt is not None:
                sa[:, t] = sat.float()
                if t % self.C == self.C - 1 or t == T - 1:
                    ckpt.view(B, H, -1, N, N)[:, :, t // self.C] = S.transpose(-1, -2).float()
        sT.copy_(S)

    def backward(self, r, log_w, k, v, a, b, dy, dsT, ckpt, sa, zero_s0, dr, dlog_w, dk, dv, da, db, ds0):
        B, T, H, N = r.shape
        w, iw = log_w.double().exp(), (-log_w.double()).exp()
        r, k, v, a, b, dy, sa = (x.double() for x in (r, k, v, a, b, dy, sa))
        G = torch.zeros(B, H, N, N, dtype=torch.float64) if dsT is None else dsT.double()
        ck = ckpt.view(B, H, -1, N, N).double()
        for c in reversed(range(ck.shape[2])):
            S = ck[:, :, c].transpose(-1, -2)
            for t in reversed(range(c * self.C, min(T, (c + 1) * self.C))):
                G = G + dy[:, t, ..., None] * r[:, t, :, None, :]
                dv[:, t] = torch.einsum("bhij,bhj->bhi", G, k[:, t]).to(dv.dtype)
                gb = torch.einsum("bhij,bhj->bhi", G, b[:, t])
                dr[:, t] = torch.einsum("bhij,bhi->bhj", S, dy[:, t]).to(dr.dtype)
                dk[:, t] = torch.einsum("bhij,bhi->bhj", G, v[:, t]).to(dk.dtype)
                db[:, t] = torch.einsum("bhij,bhi->bhj", G, sa[:, t]).to(db.dtype)
                S = (S - v[:, t, ..., None] * k[:, t, :, None, :] - sa[:, t, ..., None] * b[:, t, :, None, :]) * iw[
                    :, t, :, None, :
                ]
                if zero_s0 and t == 0:
                    S = torch.zeros_like(S)  # as the kernel: the zero initial state is used exactly
                dlog_w[:, t] = ((G * S).sum(-2) * w[:, t]).to(dlog_w.dtype)
                da[:, t] = torch.einsum("bhij,bhi->bhj", S, gb).to(da.dtype)
                G = G * w[:, t, :, None, :] + gb[..., None] * a[:, t, :, None, :]
        ds0.copy_(G)


@pytest.mark.parametrize("T", [1, 5, 16, 21])
@pytest.mark.parametrize("with_state", [True, False])
def test_backward_equations_match_autograd(T, with_state, monkeypatch):
    monkeypatch.setattr(cuda, "POISON_OUTPUTS", True)
    xs, s0, dy, ds = make_inputs(2, T, 2, N=8, dtype=torch.float64, state=with_state)
    y_ref, s_ref, g_ref = reference_grads(xs, s0, dy, ds)
    ins = [x.clone().requires_grad_() for x in xs]
    st = None if s0 is None else s0.clone().requires_grad_()
    y, s = cuda._apply(EmulatedOps(chunk_len=8), 8, tuple(ins), st)
    ((y * dy).sum() + (s * ds).sum()).backward()
    assert rel_err(y, y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-6
    grads = [x.grad for x in ins] + ([st.grad] if st is not None else [])
    for name, got, ref in zip(["r", "log_w", "k", "v", "a", "b", "state"], grads, g_ref):
        assert rel_err(got, ref) < 1e-5, name  # float32 checkpoints bound the accuracy


def test_no_grad_saves_nothing():
    xs, s0, _, _ = make_inputs(1, 3, 1, N=8, dtype=torch.float64)
    seen = {}

    class Spy(EmulatedOps):
        def forward(self, *args):
            seen["ckpt"] = args[-2]
            super().forward(*args)

    with torch.no_grad():
        cuda._apply(Spy(4), 4, tuple(x.requires_grad_() for x in xs), s0)
    assert seen["ckpt"] is None


# --- the kernel source on CPU threads (logic, indexing, chunking and tails; not timing) ---

SHIM = r"""
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
using std::min;
struct dim3 { unsigned x = 0, y = 0, z = 0; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.bits) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); return {uint16_t(u >> 16)};
}
inline thread_local dim3 threadIdx, blockIdx;
inline std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
template <class K> void emu_launch(int blocks, int threads, K kernel) {
  std::barrier<> bar(threads);
  g_barrier = &bar;
  for (int b = 0; b < blocks; ++b) {
    std::vector<std::thread> lanes;
    for (int t = 0; t < threads; ++t) lanes.emplace_back([=] { blockIdx.x = b; threadIdx.x = t; kernel(); });
    for (auto& lane : lanes) lane.join();
  }
}
"""

ENTRY = r"""
extern "C" void emu_forward(int B, int T, int H, const F* r, const F* lw, const F* k, const F* v, const F* a,
                            const F* b, const float* s0, F* y, float* sT, float* ckpt, float* sa) {
  if (ckpt) emu_launch(B * H, N, [=] { wkv7_forward_kernel<true>(T, H, r, lw, k, v, a, b, s0, y, sT, ckpt, sa); });
  else emu_launch(B * H, N, [=] { wkv7_forward_kernel<false>(T, H, r, lw, k, v, a, b, s0, y, sT, nullptr, nullptr); });
}
extern "C" void emu_backward(int B, int T, int H, const F* r, const F* lw, const F* k, const F* v, const F* a,
                             const F* b, const F* dy, const float* dsT, const float* ckpt, const float* sa, int zero_s0,
                             F* dr, F* dlw, F* dk, F* dv, F* da, F* db, float* ds0) {
  emu_launch(B * H, N, [=] { wkv7_backward_kernel(T, H, r, lw, k, v, a, b, dy, dsT, ckpt, sa, zero_s0,
                                                   dr, dlw, dk, dv, da, db, ds0); });
}
"""

EMU_CHUNK = 4  # short chunks: several checkpoints and a tail at small T


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def cpu_kernel(request, tmp_path_factory):
    """(library, dtype): wkv7.cu's kernels built by g++ for CPU threads."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    tmp = tmp_path_factory.mktemp("wkv7_cpu")
    src = (resources_dir() / "wkv7.cu").read_text()
    src = src[: src.index("}  // namespace") + len("}  // namespace")] + ENTRY  # drop the CUDA launchers
    (tmp / "shim.h").write_text(SHIM)
    (tmp / "inc").mkdir()
    (tmp / "inc" / "cuda_runtime.h").write_text("#pragma once\ntypedef int cudaError_t;\ntypedef void* cudaStream_t;\n")
    (tmp / "inc" / "cuda_bf16.h").write_text("#pragma once\n")
    (tmp / "emu.cpp").write_text(src)
    bf16 = int(request.param == torch.bfloat16)
    cmd = ["g++", "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC", f"-DVRWKV_BF16={bf16}", "-DVRWKV_N=64",
           f"-DVRWKV_C={EMU_CHUNK}", f"-I{tmp / 'inc'}", f"-I{resources_dir()}", "-include", str(tmp / "shim.h"),
           str(tmp / "emu.cpp"), "-o", str(tmp / "emu.so")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and "barrier" in res.stderr and "No such file" in res.stderr:
        pytest.skip("g++ without C++20 <barrier>")
    assert res.returncode == 0, res.stderr[-3000:]
    return ctypes.CDLL(str(tmp / "emu.so")), request.param


def resources_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("vrwkv_core.cuda_ops")))


@pytest.mark.parametrize("B,T,H", [(1, 1, 1), (2, 5, 2), (1, 8, 1), (1, 11, 2)])
@pytest.mark.parametrize("with_state", [True, False])
def test_kernel_source_on_cpu_threads(cpu_kernel, B, T, H, with_state):
    lib, dtype = cpu_kernel
    N, nchunks = 64, (T + EMU_CHUNK - 1) // EMU_CHUNK
    xs, s0, dy, ds = make_inputs(B, T, H, dtype=dtype, state=with_state, seed=T)

    def ptr(x):
        return ctypes.c_void_p(0 if x is None else x.data_ptr())

    def nan(*shape, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype)

    y, s_fin, ckpt, sa = nan(B, T, H, N, dtype=dtype), nan(B, H, N, N), nan(B * H, nchunks, N, N), nan(B, T, H, N)
    lib.emu_forward(B, T, H, *map(ptr, xs), ptr(s0), ptr(y), ptr(s_fin), ptr(ckpt), ptr(sa))
    y_ng, s_ng = nan(B, T, H, N, dtype=dtype), nan(B, H, N, N)
    lib.emu_forward(B, T, H, *map(ptr, xs), ptr(s0), ptr(y_ng), ptr(s_ng), ptr(None), ptr(None))
    assert torch.equal(y, y_ng) and torch.equal(s_fin, s_ng)
    grads = [nan(B, T, H, N, dtype=dtype) for _ in range(6)] + [nan(B, H, N, N)]
    lib.emu_backward(B, T, H, *map(ptr, xs), ptr(dy), ptr(ds), ptr(ckpt), ptr(sa), ctypes.c_int(s0 is None),
                     *map(ptr, grads))  # fmt: skip
    y_ref, s_ref, g_ref = reference_grads(xs, s0, dy, ds)
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # bf16: outputs rounded to bf16
    assert rel_err(y, y_ref) < tol and rel_err(s_fin, s_ref) < 1e-5
    for name, got, ref in zip(["r", "log_w", "k", "v", "a", "b", "state"], grads, g_ref):
        assert rel_err(got, ref) < (1e-5 if name == "state" else tol), name


# --- build and errors on any machine ---


def test_build_errors_are_one_line(monkeypatch):
    import torch.utils.cpp_extension as cpp_ext

    with pytest.raises(cuda.KernelUnavailable, match="head size"):
        cuda.build(head_size=48)
    with pytest.raises(cuda.KernelUnavailable, match="chunk_len"):
        cuda.build(chunk_len=64)
    monkeypatch.setattr(cpp_ext, "is_ninja_available", lambda: False)
    with pytest.raises(cuda.KernelUnavailable, match="ninja") as err:
        cuda.build(chunk_len=3)
    assert "\n" not in str(err.value) and err.value.hint
    monkeypatch.setattr(cpp_ext, "is_ninja_available", lambda: True)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cpp_ext, "CUDA_HOME", None)
    monkeypatch.setattr(cuda, "_FALLBACK_CUDA_HOMES", ("/nonexistent/cuda",))
    with pytest.raises(cuda.KernelUnavailable, match="nvcc not found"):
        cuda.build(chunk_len=3)


def test_cuda_backend_checks_its_inputs_before_building():
    xs, _, _, _ = make_inputs(1, 3, 1, N=8)
    with pytest.raises(ValueError, match="wkv7: k has shape"):
        cuda.wkv7_cuda(xs[0], xs[1], xs[2][:, :2], *xs[3:])
    with pytest.raises(ValueError, match="one CUDA device"):
        cuda.wkv7_cuda(*xs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_status_without_gpu():
    assert cuda.is_available(64) is False
    assert cuda.build_status() == "not available: no CUDA device"


def _cuda_home() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    return None


@pytest.mark.slow  # about 35 s per dtype on 2 shared cores (cached afterwards until the sources change)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extension_compiles(dtype, monkeypatch):
    home = _cuda_home()
    if home is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    if shutil.which("ninja") is None:
        pytest.skip("ninja not installed")
    monkeypatch.setenv("CUDA_HOME", home)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    ops = cuda.build(64, cuda.DEFAULT_CHUNK_LEN, dtype)
    schema = str(ops.forward.default._schema)
    assert "Tensor? s0" in schema and "Tensor(d!)? sa" in schema
    assert len(ops.backward.default._schema.arguments) == 18
    assert any(cuda.build_directory(64, cuda.DEFAULT_CHUNK_LEN, dtype).glob("*.so"))


# --- on a GPU: the kernel against the float64 reference ---

SHAPES = [(1, 1, 1), (2, 15, 3), (1, 16, 2), (3, 17, 2), (2, 100, 4)]  # (B, T, H)


@pytest.mark.gpu  # skipped without CUDA by conftest.py
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H", SHAPES)
@pytest.mark.parametrize("with_state", [True, False])
def test_cuda_matches_reference(B, T, H, dtype, with_state, monkeypatch):
    monkeypatch.setattr(cuda, "POISON_OUTPUTS", True)
    xs, s0, dy, ds = make_inputs(B, T, H, dtype=dtype, device="cuda", seed=T, state=with_state)
    y_ref, s_ref, g_ref = reference_grads(xs, s0, dy, ds)
    ins = [x.clone().requires_grad_() for x in xs]
    st = None if s0 is None else s0.clone().requires_grad_()
    y, s = cuda.wkv7_cuda(*ins, st)
    assert y.dtype == dtype and s.dtype == torch.float32
    ((y.double() * dy.double()).sum() + (s.double() * ds).sum()).backward()
    tol, tol_state = (2e-5, 2e-5) if dtype == torch.float32 else (4e-3, 5e-5)
    assert rel_err(y, y_ref) < tol
    assert rel_err(s, s_ref) < tol_state
    grads = [x.grad for x in ins] + ([st.grad] if st is not None else [])
    for name, got, ref in zip(["r", "log_w", "k", "v", "a", "b", "state"], grads, g_ref):
        assert rel_err(got, ref) < (tol_state if name == "state" else tol), name


@pytest.mark.gpu  # skipped without CUDA by conftest.py
def test_cuda_inference_paths_agree():
    xs, s0, _, _ = make_inputs(2, 33, 2, device="cuda")
    with torch.no_grad():
        y1, s1 = cuda.wkv7_cuda(*xs, s0)  # no checkpoints saved
    y2, s2 = cuda.wkv7_cuda(*[x.clone().requires_grad_() for x in xs], s0)
    assert rel_err(y1, y2.detach()) < 1e-6 and rel_err(s1, s2.detach()) < 1e-6
    # Two halves with the state carried over equal one pass.
    ya, sa = cuda.wkv7_cuda(*[x[:, :20] for x in xs], s0)
    yb, sb = cuda.wkv7_cuda(*[x[:, 20:] for x in xs], sa)
    assert rel_err(torch.cat([ya, yb], 1), y1) < 1e-5 and rel_err(sb, s1) < 1e-5


@pytest.mark.gpu  # skipped without CUDA by conftest.py
def test_cuda_dispatch_and_fp16():
    from vrwkv_core.kernels import wkv7

    xs, s0, _, _ = make_inputs(1, 9, 2, device="cuda")
    y, s = wkv7(*[x.half() for x in xs], s0, backend="cuda")
    y_ref, s_ref = wkv7_reference(*[x.half().double() for x in xs], s0.double())
    assert y.dtype == torch.float16 and rel_err(y, y_ref) < 2e-3 and rel_err(s, s_ref) < 1e-5
