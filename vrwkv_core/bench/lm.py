"""`vrwkv bench lm`: our RWKV-7 against the `rwkv` PyPI package on the same random weights.

Both models load one random checkpoint in the official layout (0.1B-shaped: L12, D768,
vocab 65536) from a temporary `.pth` and run side by side in this process with
`torch.set_num_threads(threads)`:

- prefill: tokens/s over a T-token prompt, last-position logits only;
- decode: tokens/s of single-token steps after the prefill;
- decode as a fraction of read bandwidth: bytes of weights one decoded token reads (every
  matrix, one embedding row, the head) / time per token, against the bandwidth of a
  large tensor `.sum()` measured here;
- optionally the same for our model with bfloat16 weights and quantized (fp16, int8, int4)
  weights, each with its quality against our fp32 (relative logit error, top-1 agreement
  over 64 teacher-forced steps), a batch-B aggregate decode row, and the peak RSS of load +
  decode per format (each in a fresh process, loading its own saved file).

Rows: {"model", "phase", "tokens_per_s", "ratio" (ours / rwkv-pkg, same phase), ...}.

    python -c "from vrwkv_core.bench.lm import run_lm_bench; print(run_lm_bench())"
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vrwkv_core.bench.rwkv_pkg import decode_pkg, load_rwkv7_pkg
from vrwkv_core.config import RWKVSection
from vrwkv_core.infer.quantize import FORMATS as QUANT_FORMATS, quantize
from vrwkv_core.model.rwkv.rwkv7 import RWKV7
from vrwkv_core.model.rwkv.state import RWKVState
from vrwkv_core.progress import Progress


def random_lm_weights(
    shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, rules: Callable[..., torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """Random official-layout LM weights with roughly trained-model scales.

    Biases, norms (ln_x centred at 0.6), the embedding, the head and unit-gain matrices are
    common to RWKV-6 and RWKV-7; `rules(name, leaf, shape, randn, uniform)` gives the
    version's own tensors (token-shift mixes, decays, LoRAs) or None.
    """
    g = torch.Generator().manual_seed(seed)
    C = shapes["emb.weight"][1]

    def randn(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
        if leaf == "bias":
            t = randn(*shape, std=0.05)
        elif owner.startswith("ln"):  # ln0/ln1/ln2/ln_out and the GroupNorm ln_x
            t = randn(*shape, std=0.1, mean=0.6 if owner == "ln_x" else 1.0)
        elif (special := rules(name, leaf, shape, randn, uniform)) is not None:
            t = special
        elif name == "emb.weight":
            t = randn(*shape, std=0.1)
        elif name == "head.weight":
            t = randn(*shape, std=2.0 / math.sqrt(C))
        else:  # receptance/key/value/gate/output and the FFN matrices: unit gain
            t = randn(*shape, std=1.0 / math.sqrt(shape[1]))
        sd[name] = t.to(dtype)
    return sd


def random_rwkv7_weights(
    cfg: RWKVSection, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A random RWKV-7 state dict in the official layout with roughly trained-model scales
    (unit-gain matrices, spread decays, non-trivial gates), so logits are not degenerate."""
    def rules(name: str, leaf: str, shape: tuple, randn: Callable, uniform: Callable) -> torch.Tensor | None:
        if leaf in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            return uniform(*shape)
        if leaf == "w0":
            return uniform(*shape, lo=-5.0, hi=2.0)
        if leaf in ("a0", "v0"):
            return randn(*shape, std=0.5)
        if leaf in ("k_k", "k_a"):
            return randn(*shape, std=0.2, mean=1.0)
        if leaf == "r_k":
            return randn(*shape, std=0.3)
        if leaf in ("w1", "a1", "v1", "g1", "w2", "a2", "v2", "g2"):
            return randn(*shape, std=0.1)
        return None

    shapes = {k: tuple(t.shape) for k, t in RWKV7(cfg, init=False).state_dict().items()}
    return random_lm_weights(shapes, seed, dtype, rules)


def _weight_bytes_per_token(model: Any) -> int:
    """Bytes one decoded token reads: every matrix once (a quantized one: its codes and
    scales), one embedding row, the head."""
    total = model.emb.weight[0].numel() * model.emb.weight.element_size()
    for name, p in (*model.named_parameters(), *model.named_buffers()):
        if p.dim() == 2 and name != "emb.weight" or name.endswith(".scales"):
            total += p.numel() * p.element_size()
    return total


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _read_bandwidth(mb: int = 512, repeats: int = 5, timer=time.perf_counter) -> float:
    """Bytes/s of a `.sum()` over a float32 tensor far larger than the caches (best of a few)."""
    x = torch.ones(mb * 2**20 // 4)
    return x.numel() * 4 / best_of(x.sum, repeats, timer)


def best_of(fn, repeats: int, timer=time.perf_counter) -> float:
    """Seconds of the fastest of `repeats` calls after one warm-up call (TorchScript and
    oneDNN specialise on the first calls)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = timer()
        fn()
        best = min(best, timer() - t0)
    return best


@torch.no_grad()
def run_lm_bench(
    threads: int = 2,
    T: int = 512,
    decode_tokens: int = 64,
    bf16: bool = False,
    repeats: int = 2,
    cfg: RWKVSection | None = None,
    progress: Progress | None = None,
    clock: str = "wall",
    wkv_backend: str = "auto",
    quant: Sequence[str] = (),
    batch: int = 0,
    rss: bool = False,
    quality_steps: int = 64,
) -> list[dict]:
    """Prefill (T tokens, last-position logits) and greedy decode tokens/s, ours vs the rwkv package.

    Ours runs with `optimize_for_inference()` (the CPU inference layout), in fp32 ("vrwkv"),
    bf16 (`bf16`) and each format of `quant` ("vrwkv-int8", ...). Rows carry "model",
    "phase" (prefill | decode), "tokens_per_s", "ratio" (over rwkv-pkg in the same phase;
    None without the package), "threads", and for decode "bytes_per_token",
    "read_bandwidth_gb_s", "bandwidth_fraction" (weight bytes per token / time per token /
    the measured read bandwidth) and, for formats other than fp32, "logit_rel_err" (mean
    ||l - l_fp32|| / ||l_fp32||) and "top1_agree" over `quality_steps` teacher-forced steps.
    `batch` > 1 adds "vrwkv-b{batch}" decode rows (fp32, aggregate tokens/s, ratio over the
    package's batch-1 decode): MKL's route and "-packed", `use_batched_route` (faster, and a
    row's logits the same bits at any batch size: what eval and serve use on CPU fp32). `rss`
    adds "peak_rss_mb" (load + decode, each format in a fresh process, from its own saved
    file) and "lm_peak_mb" (that less the process's RSS before loading: python, torch,
    vrwkv) to the decode rows. Each time is the best of
    `repeats` runs after one warm-up run. `clock="cpu"` times process CPU time instead of
    wall time: with threads=1 it is robust on a busy shared machine.
    """
    if clock not in _CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(_CLOCKS)}, got {clock!r}")
    bad = [f for f in quant if f not in QUANT_FORMATS]
    if bad:
        raise ValueError(f"quant formats must be among {', '.join(QUANT_FORMATS)}, got {bad[0]!r}")
    timer = _CLOCKS[clock]
    cfg = cfg or RWKVSection(n_layer=12, n_embd=768, head_size=64, vocab_size=65536)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    log = progress.log if progress is not None else (lambda msg: None)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (T,), generator=g).tolist()
    forced = torch.randint(0, cfg.vocab_size, (quality_steps,), generator=g).tolist()
    times: dict[tuple[str, str], float] = {}
    quality: dict[str, tuple[float, float]] = {}
    peak: dict[str, tuple[float, float]] = {}
    bytes_per_token: dict[str, int] = {}
    batched = f"vrwkv-b{batch}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench-rwkv7.pth"
            torch.save(random_rwkv7_weights(cfg), path)
            files = {"vrwkv": path}

            def load(name: str) -> Any:
                dt = torch.bfloat16 if name == "vrwkv-bf16" else None
                model = RWKV7.from_checkpoint(path, dtype=dt).use_wkv_backend(wkv_backend)
                fmt = name.removeprefix("vrwkv-")
                if fmt in QUANT_FORMATS:
                    quantize(model, fmt)
                    files[name] = Path(tmp) / f"{fmt}.safetensors"
                    model.save(files[name])
                return model.optimize_for_inference()

            names = ["vrwkv"] + (["vrwkv-bf16"] if bf16 else []) + [f"vrwkv-{f}" for f in quant]
            ids = torch.tensor([prompt])
            reference = None
            for name in names:
                model = load(name)
                times[(name, "prefill")] = best_of(lambda: model(ids, logits="last"), repeats, timer)
                _, state = model(ids, logits="last")
                times[(name, "decode")] = best_of(lambda: _decode_ours(model, state, decode_tokens), repeats, timer)
                bytes_per_token[name] = _weight_bytes_per_token(model)
                logits = _teacher_forced(model, state, forced)
                if reference is None:
                    reference = logits
                else:
                    quality[name] = _quality(logits, reference)
                log(f"{name}: prefill {T / times[(name, 'prefill')]:.1f} tok/s, "
                    f"decode {decode_tokens / times[(name, 'decode')]:.1f} tok/s")  # fmt: skip
                if name == "vrwkv" and batch > 1:  # the default route, then the opt-in packed one
                    states = RWKVState.cat([state] * batch)
                    for route in (batched, f"{batched}-packed"):
                        if route != batched:
                            model.use_batched_route()
                        times[(route, "decode")] = best_of(
                            lambda: _decode_ours(model, states, decode_tokens, batch), repeats, timer)  # fmt: skip
                        bytes_per_token[route] = bytes_per_token[name]
                del model
            if rss:
                for name in names:
                    peak[name] = _peak_rss_mb(files.get(name, path), "bf16" if name == "vrwkv-bf16" else "fp32", threads)
                    log(f"{name}: peak RSS {peak[name][0]:.0f} MB")
            pkg = load_rwkv7_pkg(path)
        if pkg is None:
            log("the rwkv package is not installed: no reference rows")
        bandwidth = _read_bandwidth(timer=timer)
        log(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
        if pkg is not None:
            times[("rwkv-pkg", "prefill")] = best_of(lambda: pkg.forward(prompt, None), repeats, timer)
            _, pstate = pkg.forward(prompt, None)
            times[("rwkv-pkg", "decode")] = best_of(lambda: decode_pkg(pkg, pstate, decode_tokens), repeats, timer)
    finally:
        torch.set_num_threads(old_threads)

    rows: list[dict] = []
    for (name, phase), seconds in times.items():
        steps = T if phase == "prefill" else decode_tokens
        n = steps * (batch if name.startswith(batched) else 1)
        ref = times.get(("rwkv-pkg", phase))
        row: dict[str, Any] = {
            "model": name, "phase": phase, "tokens_per_s": n / seconds,
            "ratio": (n / seconds) / (steps / ref) if ref is not None else None, "threads": threads, "clock": clock,
        }  # fmt: skip
        if phase == "decode":
            # the package reads the same fp32 matrices as our fp32 model
            nbytes = bytes_per_token.get(name, bytes_per_token["vrwkv"])
            row["bytes_per_token"] = nbytes
            row["read_bandwidth_gb_s"] = bandwidth / 1e9
            row["bandwidth_fraction"] = nbytes / (seconds / steps) / bandwidth  # a batched step reads them once
            if name in quality:
                row["logit_rel_err"], row["top1_agree"] = quality[name]
            if name in peak:  # the LM's own share: the peak less python + torch before loading
                row["peak_rss_mb"], row["lm_peak_mb"] = peak[name][0], peak[name][0] - peak[name][1]
        rows.append(row)
    return rows


def _teacher_forced(model: Any, state: Any, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] of single-token steps that feed `tokens` whatever was predicted."""
    out = []
    for tok in tokens:
        logits, state = model(torch.tensor([[tok]]), state=state)
        out.append(logits[0, -1].float())
    return torch.stack(out)


def _quality(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(mean relative logit error, top-1 agreement) of logits [S, V] against reference [S, V]."""
    err = ((logits - reference).norm(dim=-1) / reference.norm(dim=-1)).mean()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    return float(err), float(agree)


_RSS_SCRIPT = r"""
import json, sys, torch
from vrwkv_core.model.rwkv.rwkv7 import RWKV7
def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024
base = status("VmRSS:")  # python + torch + vrwkv, before any weight
from vrwkv_core.model.rwkv.state import RWKVState
path, dtype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
with torch.no_grad():
    model = RWKV7.from_checkpoint(path, dtype=torch.bfloat16 if dtype == "bf16" else None).eval()
    model.optimize_for_inference()
    _, state = model(torch.arange(16).view(1, 16), logits="last")
    tok = 0
    for _ in range(16):
        out, state = model(torch.tensor([[tok]]), state=state)
        tok = int(out[0, -1].argmax())
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (it survives fork + exec)
print(json.dumps({"peak_rss_mb": status("VmHWM:"), "base_rss_mb": base}))
"""


def _peak_rss_mb(path: Path, dtype: str, threads: int) -> tuple[float, float]:
    """(peak RSS, RSS before loading) in MB of a fresh process that loads the LM file at `path`
    and decodes 16 tokens."""
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), dtype, str(threads)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError("peak RSS run failed: " + " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(out["peak_rss_mb"]), float(out["base_rss_mb"])


def _decode_ours(model: Any, state: Any, n: int, batch: int = 1) -> None:
    """n greedy single-token steps of `batch` rows from `state` (left unchanged)."""
    tok = torch.zeros(batch, 1, dtype=torch.long)
    for _ in range(n):
        out, state = model(tok, state=state)
        tok = out[:, -1].argmax(-1, keepdim=True)


