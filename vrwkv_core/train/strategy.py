"""Hardware section -> Lightning Trainer arguments (accelerator, devices, precision, strategy)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vrwkv_core.errors import RecipeError

if TYPE_CHECKING:
    from vrwkv_core.config import HardwareSection

PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}


def trainer_hardware(hw: "HardwareSection") -> dict[str, Any]:
    """Trainer kwargs for the recipe's hardware; asking for a GPU without one fails here, early."""
    import torch

    accelerator = {"gpu": "cuda", "cuda": "cuda"}.get(hw.accelerator, hw.accelerator)
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    wants_gpu = accelerator == "cuda" or hw.strategy.startswith("deepspeed")
    if wants_gpu and not torch.cuda.is_available():
        what = "DeepSpeed" if hw.strategy.startswith("deepspeed") else "a CUDA accelerator"
        raise RecipeError(
            f"hardware: the recipe asks for {what} but this machine has no CUDA GPU",
            hint="run on a GPU machine, or set hardware.accelerator=cpu hardware.strategy=auto hardware.precision=fp32",
        )
    if accelerator == "cuda" and hw.devices > torch.cuda.device_count():
        raise RecipeError(f"hardware.devices: {hw.devices} GPUs asked for, {torch.cuda.device_count()} present")
    strategy: Any = hw.strategy
    if hw.strategy.startswith("deepspeed"):
        from vrwkv_core.train.deepspeed_config import deepspeed_strategy

        strategy = deepspeed_strategy(hw)
    elif hw.strategy == "ddp" and accelerator == "cpu":
        strategy = "ddp"  # gloo backend on CPU
    return {
        "accelerator": accelerator,
        "devices": hw.devices,
        "num_nodes": hw.nodes,
        "precision": PRECISION[hw.precision],
        "strategy": strategy,
    }
