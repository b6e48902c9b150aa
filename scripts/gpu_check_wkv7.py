"""Check and time the CUDA WKV-7 kernel on a GPU; one self-contained run.

    python3 scripts/gpu_check_wkv7.py                 # on a GPU machine (needs torch, ninja, nvcc)
    python3 scripts/gpu_check_wkv7.py --compile-only  # anywhere with nvcc: build only

It builds the kernel (bf16 and fp32), checks the forward output, the final state and
every gradient (r, log_w, k, v, a, b, initial state) against the float64 reference on the
GPU, with NaN-poisoned outputs, for T = 1, 15, 16, 17, 1024, 4096; then times forward and
forward+backward at B=8, T=4096, H=64, N=64 in bf16 against the chunked backend and prints
a markdown table. Exits 1 if any check fails. CUDA_HOME defaults to /usr/local/cuda.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from vrwkv_core.kernels.wkv7 import cuda  # noqa: E402
from vrwkv_core.kernels.wkv7.reference import wkv7_reference  # noqa: E402

NAMES = ["y", "state", "dr", "dlog_w", "dk", "dv", "da", "db", "ds0"]
# (B, T, H, with initial state): B*H up to 512 at short T, small B*H where the float64 loop is long.
CHECKS = [
    (8, 1, 64, True),
    (4, 15, 32, False),
    (8, 16, 64, True),
    (8, 17, 64, False),
    (3, 17, 5, True),
    (2, 1024, 8, True),
    (1, 4096, 4, True),
    (1, 4096, 2, False),
]
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (4e-3, 5e-5)}  # (outputs in dtype, fp32 states)


def make_inputs(B, T, H, N, dtype, seed, with_state, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float64)

    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    log_w = -math.exp(-0.5) * torch.sigmoid(rnd(B, T, H, N))  # the model's range (-exp(-0.5), 0)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rnd(B, T, H, N))
    s0 = rnd(B, H, N, N).float() if with_state else None
    xs = [x.to(dtype) for x in (r, log_w, k, v, a, b)]
    return xs, s0, rnd(B, T, H, N).to(dtype), rnd(B, H, N, N).float()


def run_backend(fn, xs, s0, dy, ds):
    """y, final state and the 6 (+1) gradients of sum(y*dy) + sum(S*ds)."""
    ins = [x.detach().clone().requires_grad_() for x in xs]
    st = None if s0 is None else s0.detach().clone().requires_grad_()
    y, s = fn(*ins, st)
    leaves = ins + ([st] if st is not None else [])
    grads = torch.autograd.grad([y, s], leaves, [dy.to(y.dtype), ds])
    return [y.detach(), s.detach(), *grads]


def reference(xs, s0, dy, ds):
    return run_backend(
        wkv7_reference, [x.double() for x in xs], None if s0 is None else s0.double(), dy.double(), ds.double()
    )


def rel_err(x, ref):
    x = x.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(name, fn, dtype, failures, errs):
    for B, T, H, with_state in CHECKS:
        label = f"{name} {str(dtype).replace('torch.', '')} B={B} T={T} H={H} state={with_state}"
        try:
            xs, s0, dy, ds = make_inputs(B, T, H, 64, dtype, seed=T * 131 + H, with_state=with_state)
            ref = reference(xs, s0, dy, ds)
            got = run_backend(fn, xs, s0, dy, ds)
            tol, tol_state = TOL[dtype]
            bad, worst = [], 0.0
            for n, x, rx in zip(NAMES, got, ref):
                e = rel_err(x, rx)
                worst = max(worst, e)
                if not e <= (tol_state if n in ("state", "ds0") else tol):
                    bad.append(f"{n}={e:.2e}")
            with torch.no_grad():  # the inference kernel (no checkpoints) must agree too
                y_ng, s_ng = fn(*xs, s0)
            e_y, e_s = rel_err(y_ng, ref[0]), rel_err(s_ng, ref[1])
            if not (e_y <= tol and e_s <= tol_state):
                bad.append(f"no-grad y={e_y:.2e} state={e_s:.2e}")
            errs.setdefault((name, dtype), []).append(worst)
            print(f"{'FAIL' if bad else 'ok  '} {label}: max rel err {worst:.2e} {' '.join(bad)}", flush=True)
            if bad:
                failures.append(label)
        except Exception:
            print(f"FAIL {label}: exception\n{traceback.format_exc(limit=4)}", flush=True)
            failures.append(label)
        torch.cuda.empty_cache()


def time_ms(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(fn, xs, dy):
    ins = [x.detach().clone().requires_grad_() for x in xs]

    def fwd():
        with torch.no_grad():
            fn(*xs, None)

    def fwd_bwd():
        y, _ = fn(*ins, None)
        torch.autograd.grad(y, ins, dy)

    def fwd_train():  # with the checkpoints a backward needs
        fn(*ins, None)

    out = {"fwd": time_ms(fwd), "fwd (grad)": time_ms(fwd_train), "fwd+bwd": time_ms(fwd_bwd)}
    with torch.no_grad():
        out["y"] = fn(*xs, None)[0]
    return out


def build_all(compile_only):
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    if compile_only and not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    for dtype in (torch.bfloat16, torch.float32):
        t = time.perf_counter()
        cuda.build(64, cuda.DEFAULT_CHUNK_LEN, dtype)
        where = cuda.build_directory(64, cuda.DEFAULT_CHUNK_LEN, dtype)
        print(f"built {dtype} kernel in {time.perf_counter() - t:.1f} s: {where}", flush=True)
    tool = shutil.which("cuobjdump") or str(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump")
    if Path(tool).exists():  # registers and spills of each kernel, for the record
        for so in cuda.build_directory(64, 16, torch.bfloat16).glob("*.so"):
            res = subprocess.run([tool, "-res-usage", str(so)], capture_output=True, text=True)
            print("\n".join(ln.strip() for ln in res.stdout.splitlines() if "REG" in ln or "Function" in ln))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", action="store_true", help="build the extension and stop (no GPU needed)")
    parser.add_argument("--skip-bench", action="store_true", help="checks only, no timing")
    args = parser.parse_args()

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}", flush=True)
    if not args.compile_only and not torch.cuda.is_available():
        print("no CUDA device: run with --compile-only to just build")
        return 1
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    try:
        build_all(args.compile_only)
    except Exception as err:
        print(f"BUILD FAILED: {err}\nhint: {getattr(err, 'hint', '')}")
        return 1
    if args.compile_only:
        return 0

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference and chunked run plain fp32
    torch.backends.cudnn.allow_tf32 = False
    failures: list[str] = []
    errs: dict = {}
    cuda.POISON_OUTPUTS = True
    for dtype in (torch.float32, torch.bfloat16):
        check("cuda", cuda.wkv7_cuda, dtype, failures, errs)
    chunked = None
    try:
        from vrwkv_core.kernels.wkv7.chunked import wkv7_chunked as chunked
    except Exception as err:
        print(f"chunked backend unavailable: {err}")
    cuda.POISON_OUTPUTS = False

    if chunked is not None:  # chunked's accuracy on one short shape, for the table
        try:
            xs_s, s0_s, dy_s, ds_s = make_inputs(2, 100, 4, 64, torch.bfloat16, seed=1, with_state=True)
            got = run_backend(chunked, xs_s, s0_s, dy_s, ds_s)
            ref = reference(xs_s, s0_s, dy_s, ds_s)
            errs[("chunked", torch.bfloat16)] = [max(rel_err(x, r) for x, r in zip(got, ref))]
        except Exception as err:
            print(f"chunked accuracy check failed: {type(err).__name__}: {str(err)[:200]}")

    if not args.skip_bench:
        B, T, H, N = 8, 4096, 64, 64
        xs, _, dy, _ = make_inputs(B, T, H, N, torch.bfloat16, seed=0, with_state=False)
        results = {}
        for name, fn in (("cuda", cuda.wkv7_cuda), ("chunked", chunked)):
            if fn is None:
                continue
            try:
                results[name] = bench(fn, xs, dy)
            except Exception as err:
                print(f"{name} timing failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            torch.cuda.empty_cache()
        print("\n| shape (bf16) | backend | fwd ms | fwd+bwd ms | max rel err vs fp64 ref | y rel diff vs cuda |")
        print("|---|---|---|---|---|---|")
        for name, res in results.items():
            checked = max(errs.get((name, torch.bfloat16), [float("nan")]))
            diff = "-"
            if name != "cuda" and "cuda" in results:
                diff = f"{rel_err(res['y'], results['cuda']['y'].double()):.1e}"
            shape = f"B={B} T={T} H={H} N={N}"
            print(f"| {shape} | {name} | {res['fwd']:.2f} | {res['fwd+bwd']:.2f} | {checked:.1e} | {diff} |")
        for name, res in results.items():
            bwd = res["fwd+bwd"] - res["fwd (grad)"]
            print(f"{name}: forward with grad enabled {res['fwd (grad)']:.2f} ms, backward alone ~{bwd:.2f} ms")
        if "cuda" in results and results["cuda"]["fwd+bwd"] > 8.0:
            print(f"note: cuda fwd+bwd {results['cuda']['fwd+bwd']:.2f} ms is above the 8 ms aim")

    print(f"\n{len(failures)} check(s) failed" + (": " + "; ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
