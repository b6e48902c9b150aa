"""Networks only (no file reading or writing): the RWKV LMs, vision towers, projector, VisualRWKV.

    from vrwkv_core.model import RWKV7, RWKV6, RWKVState, VisualRWKV, FAMILIES, family

Weight files are `vrwkv_core.checkpoint`'s; `from_checkpoint` / `save_pretrained` hand over to it.
"""

from vrwkv_core.model.families import FAMILIES, Family, family, family_of_state_dict
from vrwkv_core.model.rwkv import RWKV6, RWKV7, LoraDims, LoraDims6, RWKVState
from vrwkv_core.model.visual_rwkv import VisualRWKV

__all__ = ["FAMILIES", "RWKV6", "RWKV7", "Family", "LoraDims", "LoraDims6", "RWKVState", "VisualRWKV", "family",
           "family_of_state_dict"]  # fmt: skip
