"""The DeepSpeed config built from the recipe's hardware section (pure data, unit-tested).

ZeRO stage from `hardware.strategy` (deepspeed_stage_1/2/3), bucket sizes from
`ds_bucket_mb`, optimizer states (and at stage 3 parameters) offloaded to CPU with
`cpu_offload`. Gradient clipping is left to Lightning, which copies the stage's grad_clip
into the config; gradient accumulation likewise. Importing DeepSpeed happens only when
the strategy is built, on a GPU machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vrwkv_core.config import HardwareSection


def deepspeed_config(hw: "HardwareSection", micro_batch: int | None = None) -> dict[str, Any]:
    """ZeRO stage from `strategy`, bucket sizes from `ds_bucket_mb`, optional CPU offload."""
    stage = int(hw.strategy.rsplit("_", 1)[-1])
    bucket = int(hw.ds_bucket_mb * 1e6)
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "allgather_partitions": True,
        "allgather_bucket_size": bucket,
        "reduce_scatter": True,
        "reduce_bucket_size": bucket,
    }
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": int(1e6),
                     "stage3_gather_16bit_weights_on_model_save": True})  # fmt: skip
    if hw.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        # DeepSpeed >= 0.18 also checks bf16 gradients for inf/NaN and skips such a step
        # (bf16.check_grad_overflow, on by default; older versions reject the key).
        "bf16": {"enabled": hw.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # Offload with torch's AdamW (the fallback when DeepSpeed's CPU-Adam cannot be built).
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": False,
    }
    if micro_batch:
        # Else Lightning builds a train loader just to read its batch size.
        config["train_micro_batch_size_per_gpu"] = int(micro_batch)
    return config


def deepspeed_strategy(hw: "HardwareSection", micro_batch: int | None = None) -> Any:
    """Lightning's DeepSpeedStrategy with our config."""
    from pytorch_lightning.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(config=deepspeed_config(hw, micro_batch))
