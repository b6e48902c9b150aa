"""Where vrwkv keeps files on this machine; read from the environment at each call, never at import.

    $VRWKV_CACHE_DIR          vrwkv's own cache (default $XDG_CACHE_HOME/vrwkv, i.e. ~/.cache/vrwkv)
      verified.json           sha256 records of downloaded files (hub/integrity.py)
      extensions/<torch tag>  built CUDA kernels (kernels/wkv7/cuda.py); $TORCH_EXTENSIONS_DIR, torch's
                              own variable, replaces `extensions/` when set
    huggingface_hub's cache   the downloads themselves ($HF_HUB_CACHE, or $HF_HOME/hub,
                              default ~/.cache/huggingface/hub)

`vrwkv env` prints them (`cache_paths`).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VRWKV_CACHE_DIR"


def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()


def cache_dir() -> Path:
    """vrwkv's own cache root: $VRWKV_CACHE_DIR, else $XDG_CACHE_HOME/vrwkv (~/.cache/vrwkv)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return _xdg_cache() / "vrwkv"


def verified_record() -> Path:
    """The sha256 record of downloaded files."""
    return cache_dir() / "verified.json"


def extensions_dir() -> Path:
    """Where CUDA kernels are built (one subfolder per torch/CUDA/Python combination)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser()
    return cache_dir() / "extensions"


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, as huggingface_hub resolves it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return _xdg_cache() / "huggingface" / "hub"


def cache_paths() -> dict[str, str]:
    """The locations above, for `vrwkv env`."""
    return {
        "vrwkv cache": str(cache_dir()),
        "verified hashes": str(verified_record()),
        "kernel builds": str(extensions_dir()),
        "hub cache": str(hf_cache_dir()),
    }
