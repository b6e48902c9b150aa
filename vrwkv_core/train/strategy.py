"""Hardware section -> Lightning Trainer arguments (accelerator, devices, nodes, precision, strategy).

Asking for a GPU or DeepSpeed on a machine without CUDA fails here, before anything is
built (Lightning would only notice deep inside fit, or not at all on CPU). Several devices
or nodes mean DDP unless a DeepSpeed stage is named; Lightning reads the usual launch
environment (MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE, SLURM_*) for multi-node runs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from vrwkv_core.errors import RecipeError
from vrwkv_core.train.deepspeed_config import deepspeed_strategy

if TYPE_CHECKING:
    from vrwkv_core.config import HardwareSection

PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}


def trainer_hardware(hw: "HardwareSection", micro_batch: int | None = None) -> dict[str, Any]:
    """Trainer kwargs for the recipe's hardware; asking for a GPU without one fails here, early."""
    import torch

    accelerator = {"gpu": "cuda", "cuda": "cuda"}.get(hw.accelerator, hw.accelerator)
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    deepspeed = hw.strategy.startswith("deepspeed")
    if (accelerator == "cuda" or deepspeed) and not torch.cuda.is_available():
        what = "DeepSpeed" if deepspeed else "a CUDA accelerator"
        raise RecipeError(
            f"hardware: the recipe asks for {what} but this machine has no CUDA GPU",
            hint="run on a GPU machine, or set hardware.accelerator=cpu hardware.strategy=auto hardware.precision=fp32",
        )
    if deepspeed and accelerator == "cpu":
        raise RecipeError("hardware: DeepSpeed needs hardware.accelerator=gpu (or auto)")
    if accelerator == "cuda" and hw.devices > torch.cuda.device_count():
        raise RecipeError(f"hardware.devices: {hw.devices} GPUs asked for, {torch.cuda.device_count()} present")
    strategy: Any = hw.strategy
    if deepspeed:
        strategy = deepspeed_strategy(hw, micro_batch)
    elif hw.strategy == "auto" and hw.devices * hw.nodes > 1:
        strategy = "ddp"  # one process per device (gloo on CPU, NCCL on GPU)
    return {
        "accelerator": accelerator,
        "devices": hw.devices,
        "num_nodes": hw.nodes,
        "precision": PRECISION[hw.precision],
        "strategy": strategy,
    }


def is_launch_rank_zero() -> bool:
    """Whether this is the first process of a (possibly multi-process) launch, as the launch
    environment says; for printing from rank 0 only where no Trainer exists."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit() and not (key == "SLURM_PROCID" and os.environ.get("SLURM_NTASKS", "1") in ("", "1")):
            return int(value) == 0
    return all(os.environ.get(key, "0") in ("", "0") for key in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))
