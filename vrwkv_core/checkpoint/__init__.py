"""Everything that reads or writes weights (the networks in `vrwkv_core.model` never touch files).

- tensors.py: the one reader (safetensors, sharded safetensors, weights-only `.pth`) and the
  strict name/shape check;
- formats/: key maps of released files, one module per family (`released_v0700`,
  `released_v060`), and the vision towers' own files (`towers`);
- build.py: meta-device layouts filled by assignment; `build_from_parts` starts new models;
- load.py: `load_checkpoint` (our folders, lone safetensors, released `.pth`, `hub:NAME`);
- ours.py: our model folders, LM safetensors and RNN state files;
- export.py: our folders -> released `.pth` layouts.
"""

from vrwkv_core.checkpoint.build import build_from_parts
from vrwkv_core.checkpoint.export import export_pth, export_quantized
from vrwkv_core.checkpoint.load import load_checkpoint, load_pretrained, load_released, load_visual_rwkv
from vrwkv_core.checkpoint.ours import read_recipe, save_pretrained
from vrwkv_core.checkpoint.tensors import read_weights

__all__ = ["build_from_parts", "export_pth", "export_quantized", "load_checkpoint", "load_pretrained", "load_released",
           "load_visual_rwkv", "read_recipe", "read_weights", "save_pretrained"]  # fmt: skip
