"""`vrwkv bench lm`: our RWKV-7 against the `rwkv` PyPI package on the same random weights.

Both models load one random checkpoint in the official layout (0.1B-shaped: L12, D768,
vocab 65536) from a temporary `.pth` and run side by side in this process with
`torch.set_num_threads(threads)`:

- prefill: tokens/s over a T-token prompt, last-position logits only;
- decode: tokens/s of single-token steps after the prefill;
- decode as a fraction of read bandwidth: bytes of weights one decoded token reads (every
  matrix, one embedding row, the head) / time per token, against the bandwidth of a
  large tensor `.sum()` measured here;
- optionally the same for our model with bfloat16 weights.

Rows: {"model", "phase", "tokens_per_s", "ratio" (ours / rwkv-pkg, same phase), ...}.

    python -c "from vrwkv_core.bench.lm import run_lm_bench; print(run_lm_bench())"
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from vrwkv_core.bench.rwkv_pkg import decode_pkg, load_rwkv7_pkg
from vrwkv_core.config import RWKVSection
from vrwkv_core.model.rwkv.rwkv7 import RWKV7
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
    """Bytes one decoded token reads: every matrix once, one embedding row, the head."""
    total = model.emb.weight[0].numel() * model.emb.weight.element_size()
    for name, p in model.named_parameters():
        if p.dim() == 2 and name != "emb.weight":
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
) -> list[dict]:
    """Prefill (T tokens, last-position logits) and greedy decode tokens/s, ours vs the rwkv package.

    Ours runs with `optimize_for_inference()` (the CPU inference layout). Rows carry
    "model" (vrwkv | vrwkv-bf16 | rwkv-pkg), "phase" (prefill | decode), "tokens_per_s",
    "ratio" (over rwkv-pkg in the same phase; None without the package), "threads", and
    for decode "bytes_per_token", "read_bandwidth_gb_s" and "bandwidth_fraction" (weight
    bytes per token / time per token / the measured read bandwidth). Each time is the
    best of `repeats` runs after one warm-up run. `clock="cpu"` times process CPU time
    instead of wall time: with threads=1 it is robust on a busy shared machine. `wkv_backend`
    is the WKV kernel our prefill runs through.
    """
    if clock not in _CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(_CLOCKS)}, got {clock!r}")
    timer = _CLOCKS[clock]
    cfg = cfg or RWKVSection(n_layer=12, n_embd=768, head_size=64, vocab_size=65536)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    log = progress.log if progress is not None else (lambda msg: None)
    prompt = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(1)).tolist()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench-rwkv7.pth"
            torch.save(random_rwkv7_weights(cfg), path)
            ours = {"vrwkv": RWKV7.from_checkpoint(path).use_wkv_backend(wkv_backend).optimize_for_inference()}
            if bf16:
                ours["vrwkv-bf16"] = (RWKV7.from_checkpoint(path, dtype=torch.bfloat16).use_wkv_backend(wkv_backend)
                                      .optimize_for_inference())
            pkg = load_rwkv7_pkg(path)
        if pkg is None:
            log("the rwkv package is not installed: no reference rows")
        bandwidth = _read_bandwidth(timer=timer)
        log(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")

        times: dict[tuple[str, str], float] = {}
        ids = torch.tensor([prompt])
        for name, model in ours.items():
            times[(name, "prefill")] = best_of(lambda: model(ids, logits="last"), repeats, timer)
            _, state = model(ids, logits="last")
            times[(name, "decode")] = best_of(lambda: _decode_ours(model, state, decode_tokens), repeats, timer)
            log(f"{name}: prefill {T / times[(name, 'prefill')]:.1f} tok/s")
        if pkg is not None:
            times[("rwkv-pkg", "prefill")] = best_of(lambda: pkg.forward(prompt, None), repeats, timer)
            _, pstate = pkg.forward(prompt, None)
            times[("rwkv-pkg", "decode")] = best_of(lambda: decode_pkg(pkg, pstate, decode_tokens), repeats, timer)
    finally:
        torch.set_num_threads(old_threads)

    rows: list[dict] = []
    for (name, phase), seconds in times.items():
        n = T if phase == "prefill" else decode_tokens
        ref = times.get(("rwkv-pkg", phase))
        row: dict[str, Any] = {
            "model": name, "phase": phase, "tokens_per_s": n / seconds,
            "ratio": ref / seconds if ref is not None else None, "threads": threads, "clock": clock,
        }  # fmt: skip
        if phase == "decode":
            # the package reads the same fp32 matrices as our fp32 model
            nbytes = _weight_bytes_per_token(ours.get(name, ours["vrwkv"]))
            row["bytes_per_token"] = nbytes
            row["read_bandwidth_gb_s"] = bandwidth / 1e9
            row["bandwidth_fraction"] = nbytes / (seconds / n) / bandwidth
        rows.append(row)
    return rows


def _decode_ours(model: Any, state: Any, n: int) -> None:
    """n greedy single-token steps from `state` (left unchanged)."""
    tok = 0
    for _ in range(n):
        out, state = model(torch.tensor([[tok]]), state=state)
        tok = int(out[0, -1].argmax())


