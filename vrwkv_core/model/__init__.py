"""Models: the RWKV-7 language model and its recurrent state (more models join here)."""

from vrwkv_core.model.rwkv6 import RWKV6, LoraDims6
from vrwkv_core.model.rwkv7 import RWKV7, LoraDims, config_from_state_dict, read_weights
from vrwkv_core.model.state import RWKVState

__all__ = ["RWKV6", "RWKV7", "LoraDims", "LoraDims6", "RWKVState", "config_from_state_dict", "read_weights"]
