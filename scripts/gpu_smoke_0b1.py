"""GPU smoke test of the released 0.1B recipe: pretrain a few hundred steps with DeepSpeed.

Random tower and LM weights (nothing is downloaded), the synthetic shapes data upscaled by
the towers' own transforms, `recipes/0b1.yaml` with DeepSpeed stage 1 in bf16 on one GPU.
Prints steps/s, tokens/s and peak GPU memory. Run on a machine with a CUDA GPU:

    python3 scripts/gpu_smoke_0b1.py --steps 200 --micro-batch 8 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--strategy", default="deepspeed_stage_1")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--out", default="/tmp/vrwkv_smoke")
    args = parser.parse_args()

    import torch

    from vrwkv_core.config import load_recipe
    from vrwkv_core.data.shapes import prepare_shapes
    from vrwkv_core.train import run_stage

    if not torch.cuda.is_available():
        print("no CUDA GPU: this script is for a GPU machine")
        return 2
    out = Path(args.out)
    data = out / "shapes"
    if not data.exists():
        prepare_shapes(data, n_train=max(2000, args.steps * args.micro_batch), n_eval=20, seed=0)
    overrides = [
        "model.rwkv.checkpoint=null",
        "model.vision.checkpoints.dino=null",
        "model.vision.checkpoints.siglip=null",
        "model.vision.checkpoints.sam=null",
        f"data.root={data}",
        "data.pretrain_file=pretrain.jsonl",
        "data.image_folder=images",
        "data.val_fraction=0",
        f"data.num_workers={args.workers}",
        f"pretrain.out_dir={out / 'pretrain'}",
        f"pretrain.max_steps={args.steps}",
        f"pretrain.micro_batch={args.micro_batch}",
        "pretrain.warmup_steps=10",
        f"pretrain.save_every_steps={args.steps}",
        "pretrain.val_every_steps=0",
        "hardware.devices=1",
        f"hardware.strategy={args.strategy}",
    ]
    recipe = load_recipe(REPO / "recipes" / "0b1.yaml", overrides)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_stage(recipe, "pretrain")
    wall = time.perf_counter() - t0
    rows = list(csv.DictReader(open(out / "pretrain" / "metrics.csv")))
    tps = [float(r["tokens_per_s"]) for r in rows if r.get("tokens_per_s")]
    steady = tps[len(tps) // 4 :] or tps
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "strategy": args.strategy,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "wall_s_including_build": round(wall, 1),
        "tokens_per_s_median": round(sorted(steady)[len(steady) // 2], 1) if steady else None,
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "outputs": sorted(p.name for p in (out / "pretrain").iterdir()),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
