"""GPU check: the CUDA-graph decode step equals the eager one, and how much faster it is.

On a machine with a CUDA GPU (no data needed: random 0.1B-shaped RWKV-7 weights):

    python scripts/gpu_check_decode.py                 # bf16, batch 1 and 8, 64 steps
    python scripts/gpu_check_decode.py --dtype fp32 --batches 1 4 16

For each batch size it decodes `--steps` greedy tokens eagerly and through the graphs from
the same prefilled state, asserts the same tokens and logits within `--tol` (max |diff| /
std), prints tokens/s of both, and exits non-zero on a mismatch. Without CUDA it says so
and exits 0 (nothing to check).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from vrwkv_core.bench.lm import random_rwkv7_weights
from vrwkv_core.config import RWKVSection
from vrwkv_core.infer.cuda_graph import disable_cuda_graphs, enable_cuda_graphs
from vrwkv_core.infer.generate import decode_step
from vrwkv_core.model.rwkv.rwkv7 import RWKV7
from vrwkv_core.model.rwkv.state import RWKVState


def decode(lm: RWKV7, state: RWKVState, first: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], float]:
    """Greedy steps from `state`: (logits per step, seconds)."""
    tokens, out = first, []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = decode_step(lm, tokens, state)
        out.append(logits)
        tokens = logits.argmax(-1)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = RWKVSection(n_layer=12, n_embd=768, head_size=64, vocab_size=65536)
    lm = RWKV7.from_state_dict(random_rwkv7_weights(cfg), device="cuda", dtype=dtype).eval()
    ok = True
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, cfg.vocab_size, (batch, 32), generator=g).cuda()
        with torch.no_grad():
            out, state = lm(prompt, logits="last")
        first = out[:, -1].argmax(-1)
        disable_cuda_graphs(lm)
        decode(lm, state, first, 4)  # warm-up
        eager, eager_s = decode(lm, state, first, args.steps)
        enable_cuda_graphs(lm)
        decode(lm, state, first, 4)  # capture + warm-up
        graph, graph_s = decode(lm, state, first, args.steps)
        disable_cuda_graphs(lm)
        worst = max(float((a - b).abs().max() / b.std()) for a, b in zip(graph, eager))
        same = all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(graph, eager))
        good = same and worst <= args.tol
        ok &= good
        print(f"batch {batch:3d} {args.dtype}: eager {batch * args.steps / eager_s:8.1f} tok/s, "
              f"graph {batch * args.steps / graph_s:8.1f} tok/s ({eager_s / graph_s:.2f}x), "
              f"max|diff|/std {worst:.2e}, same tokens {same} -> {'OK' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
