"""`vrwkv bench lm`, RWKV-6 rows: our RWKV6 against the `rwkv` PyPI package on the same random weights.

One random x060 checkpoint in the official layout (1.6B-shaped by default: L24, C2048,
vocab 65536, ~1.6B parameters, 6.4 GB in fp32) is written to a temporary `.pth`. Our
model loads it in this process; the `rwkv` package runs in a subprocess (it picks its
architecture from environment variables read at import, and RWKV-7 rows in this process
set RWKV_V7_ON), with RWKV_JIT_ON=0, RWKV_CUDA_ON=0 and strategy "cpu fp32". Both use
`threads` threads:

- prefill: tokens/s over a T-token prompt, last-position logits only;
- decode: tokens/s of greedy single-token steps after the prefill (ours after
  `optimize_for_inference`, which stores the matrices column-major as the package does).

Rows: {"model": "vrwkv-rwkv6" | "rwkv-pkg-rwkv6", "phase", "tokens_per_s", "ratio" (ours /
rwkv-pkg, same phase), "threads", "shape"}. The same subprocess runner gives the parity
tests their reference logits (`rwkv_pkg.rwkv_pkg_run`).

    python -c "from vrwkv_core.bench.lm6 import run_rwkv6_bench; print(run_rwkv6_bench())"
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from vrwkv_core.bench.lm import best_of, random_lm_weights
from vrwkv_core.bench.rwkv_pkg import rwkv_pkg_run
from vrwkv_core.config import RWKVSection
from vrwkv_core.model.rwkv.rwkv6 import RWKV6
from vrwkv_core.progress import Progress

SHAPE_1B6 = RWKVSection(version="x060", n_layer=24, n_embd=2048, head_size=64, vocab_size=65536)


def random_rwkv6_weights(cfg: RWKVSection, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random RWKV-6 state dict in the official layout with roughly trained-model scales:
    unit-gain matrices, token-shift mixes in [0, 1], decay exponents spread over [-6, 2.5]
    (so some channels forget almost at once, as trained ones do), a few exponents at 5
    (decay exactly 0 in float32), non-trivial LoRAs and bonus."""
    C = cfg.n_embd

    def rules(name: str, leaf: str, shape: tuple, randn: Callable, uniform: Callable) -> torch.Tensor | None:
        if leaf in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
            return uniform(*shape)
        if leaf == "time_decay":
            t = uniform(*shape, lo=-6.0, hi=2.5)
            t.view(-1)[:: max(C // 8, 1)] = 5.0
            return t
        if leaf == "time_faaaa":
            return randn(*shape, std=0.3, mean=0.3)
        if leaf in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"):
            return randn(*shape, std=0.1)
        return None

    shapes = {k: tuple(t.shape) for k, t in RWKV6(cfg, init=False).state_dict().items()}
    return random_lm_weights(shapes, seed, dtype, rules)


@torch.no_grad()
def run_rwkv6_bench(
    threads: int = 2,
    T: int = 128,
    decode_tokens: int = 16,
    repeats: int = 1,
    bf16: bool = False,
    cfg: RWKVSection | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """Prefill (T tokens, last logits) and decode tokens/s of our RWKV6 vs the rwkv package.

    Defaults are sized for a busy CPU: the 1.6B shape, a 128-token prompt, 16 decode
    steps. Also checks the two greedy continuations agree ("greedy_match" on our fp32 row);
    `bf16` adds rows for our model with bfloat16 weights.
    """
    cfg = cfg or SHAPE_1B6
    torch.set_num_threads(threads)
    log = progress.log if progress is not None else (lambda msg: None)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (T,), generator=gen).tolist()
    shape = f"L{cfg.n_layer} C{cfg.n_embd}"
    times: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-rwkv6.pth"
        sd = random_rwkv6_weights(cfg)
        torch.save(sd, path)
        del sd
        ids = torch.tensor([prompt])
        ours = [("vrwkv-rwkv6", torch.float32)] + ([("vrwkv-rwkv6-bf16", torch.bfloat16)] if bf16 else [])
        ours_tokens: dict[str, list[int]] = {}
        for name, dtype in ours:
            model = RWKV6.from_checkpoint(path, dtype=dtype)
            log(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {dtype}")
            model(ids[:, :16], logits="last")  # warm-up
            times[(name, "prefill")] = best_of(lambda: model(ids, logits="last"), repeats)
            out, state = model(ids, logits="last")
            model.optimize_for_inference()  # the CPU decoding layout
            model(torch.tensor([[0]]), state=state)  # warm-up
            tokens = ours_tokens[name] = []
            tok = int(out[0, -1].argmax())
            t0 = time.perf_counter()
            for _ in range(decode_tokens):
                tokens.append(tok)
                o, state = model(torch.tensor([[tok]]), state=state)
                tok = int(o[0, -1].argmax())
            times[(name, "decode")] = time.perf_counter() - t0
            log(f"{name}: prefill {T / times[(name, 'prefill')]:.1f} tok/s")
            del model, state
        pkg = None
        try:
            pkg = rwkv_pkg_run(path, prompt, decode_tokens, threads, timing=True, repeats=repeats,
                               full_output=False, save_logits=False)  # fmt: skip
        except ImportError:
            log("rwkv package not installed: no reference rows")
    if pkg is not None:
        times[("rwkv-pkg-rwkv6", "prefill")] = pkg["prefill_s"]
        times[("rwkv-pkg-rwkv6", "decode")] = pkg["decode_s"]
    rows = []
    for (name, phase), seconds in times.items():
        n = T if phase == "prefill" else decode_tokens
        ref = times.get(("rwkv-pkg-rwkv6", phase))
        row = {"model": name, "phase": phase, "tokens_per_s": n / seconds, "ratio": ref / seconds if ref else None,
               "threads": threads, "shape": shape}  # fmt: skip
        if name == "vrwkv-rwkv6" and pkg is not None:  # fp32 only: bf16 rounding may change a random model's argmax
            row["greedy_match"] = pkg["tokens"] == ours_tokens[name]
        rows.append(row)
    return rows
