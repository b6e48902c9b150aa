"""Facts about this machine for `vrwkv env`: versions, CUDA, kernel build, cache paths."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from vrwkv_core.kernels.wkv7 import cuda as cuda_kernel
from vrwkv_core.paths import cache_paths


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _nvcc() -> str:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or str(Path(cuda_home) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "not runnable"
    release = [line for line in out.splitlines() if "release" in line]
    return f"{release[-1].strip() if release else out.strip()} ({nvcc})"


def collect_env(try_build: bool = True) -> dict[str, str]:
    """Versions and paths as an ordered dict of strings."""
    import torch

    info: dict[str, str] = {
        "vrwkv": _version("vrwkv"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": str(torch.version.cuda),
        "CUDA available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        info["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    info["nvcc"] = _nvcc()
    info["ninja"] = _version("ninja")
    info["deepspeed"] = _version("deepspeed")
    info["pytorch-lightning"] = _version("pytorch-lightning")
    info["timm"] = _version("timm")
    info["huggingface-hub"] = _version("huggingface-hub")
    info["CPU threads"] = str(torch.get_num_threads())
    info["CUDA WKV sources"] = cuda_kernel.sources_status()
    try:
        info["CUDA WKV kernel"] = cuda_kernel.build_status() if try_build else "not checked (--no-build)"
    except Exception as err:  # the report must never fail because the kernel module does
        info["CUDA WKV kernel"] = f"not available: {err}"
    info.update(cache_paths())
    info["outputs"] = str(Path.cwd() / "out")
    return info
