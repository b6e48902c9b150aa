"""The DeepSpeed config built from the recipe's hardware section (pure data, unit-tested)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vrwkv_core.config import HardwareSection


def deepspeed_config(hw: "HardwareSection") -> dict[str, Any]:
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
        zero.update({"stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": int(1e6)})
    if hw.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": hw.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # Lightning clips (gradient_clip_val)
        "wall_clock_breakdown": False,
    }


def deepspeed_strategy(hw: "HardwareSection") -> Any:
    """Lightning's DeepSpeedStrategy with our config."""
    from pytorch_lightning.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(config=deepspeed_config(hw))
