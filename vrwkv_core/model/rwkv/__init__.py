"""The RWKV language models: RWKV-7 (x070), RWKV-6 (x060), their shared layers and state."""

from vrwkv_core.model.rwkv.rwkv6 import RWKV6, LoraDims6
from vrwkv_core.model.rwkv.rwkv7 import RWKV7, LoraDims
from vrwkv_core.model.rwkv.state import RWKVState

__all__ = ["RWKV6", "RWKV7", "LoraDims", "LoraDims6", "RWKVState"]
