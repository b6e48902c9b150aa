"""Models: the RWKV-7 language model and its recurrent state (more models join here)."""

from vrwkv_core.model.rwkv7 import RWKV7, LoraDims, config_from_state_dict, read_weights
from vrwkv_core.model.state import RWKVState

__all__ = ["RWKV7", "LoraDims", "RWKVState", "config_from_state_dict", "read_weights"]
