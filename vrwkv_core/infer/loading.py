"""Resolve a `--model` argument (our output dir, a released .pth, a registry name) to a model.

- A directory with `config.yaml` + `model.safetensors` (what a training stage writes),
  or a `.pth` / `.safetensors` file: `VisualRWKV.from_checkpoint` (the checkpoint
  module's `load_visual_rwkv`). `load_model_dir` is a minimal strict loader for our
  directories, used only where that module is absent.
- Anything else goes through `vrwkv_core.hub.resolve` (offline and absent: a DownloadError
  naming the `vrwkv download NAME` command; `download=True` fetches it).

Device "auto" is CUDA when available, else CPU; dtype "auto" is bf16 on CUDA, fp32 on CPU.

    vlm = load_model("out/tiny/finetune", device="cpu")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from vrwkv_core.errors import CheckpointError, VrwkvError

if TYPE_CHECKING:
    from vrwkv_core.model.visual_rwkv import VisualRWKV

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
RELEASED_CTX_LEN = 2048  # ctx_len of the released v7.00 training runs


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; anything else must be a valid, present device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise VrwkvError(f"unknown device {device!r}", hint="use cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VrwkvError(f"device {device!r} requested but CUDA is not available", hint="use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere; or one of fp32, bf16, fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise VrwkvError(f"unknown dtype {dtype!r}", hint="use fp32, bf16 or auto")
    return DTYPES[dtype]


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "model.safetensors").is_file()


def load_model_dir(path: str | Path, device: torch.device, dtype: torch.dtype) -> VisualRWKV:
    """One of our output dirs: config.yaml's model section + model.safetensors (strict)."""
    import yaml
    from safetensors.torch import load_file

    from vrwkv_core.config import recipe_from_dict
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    path = Path(path)
    for name in ("config.yaml", "model.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: no {name} (not a vrwkv output directory)")
    try:
        data = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path / 'config.yaml'}: malformed YAML ({str(err).splitlines()[0]})") from None
    recipe = recipe_from_dict(data, source=str(path / "config.yaml"))
    model_cfg = recipe.model
    from dataclasses import replace

    # The weights come from the file: never fetch the LM checkpoint or tower files again.
    model_cfg = replace(model_cfg, rwkv=replace(model_cfg.rwkv, checkpoint=None))
    try:
        sd = load_file(str(path / "model.safetensors"), device="cpu")
    except Exception as err:
        raise CheckpointError(f"{path / 'model.safetensors'}: cannot read ({str(err).splitlines()[0]})") from None
    vlm = VisualRWKV(model_cfg)
    expected = vlm.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong)) if v]  # fmt: skip
        raise CheckpointError(f"{path / 'model.safetensors'}: does not match config.yaml's model: " + "; ".join(parts))
    vlm.load_state_dict(sd, strict=True)
    return vlm.to(device=device, dtype=dtype).eval()


def load_model(
    spec: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    download: bool = False,
) -> VisualRWKV:
    """A ready-to-run VisualRWKV (eval mode) for a dir, a checkpoint file or a registry name."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(str(spec)).expanduser()
    if not path.exists():
        from vrwkv_core.hub import resolve

        path = Path(resolve(str(spec), download=download))
        if not path.exists():
            raise CheckpointError(f"{spec}: no such model directory or file",
                                  hint="pass an output dir (config.yaml + model.safetensors), a .pth, or a registry name")  # fmt: skip
    loader = _checkpoint_loader()
    if path.is_dir():
        if not _is_model_dir(path):
            raise CheckpointError(f"{path}: a model directory needs config.yaml and model.safetensors")
        if loader is None:
            return load_model_dir(path, dev, dt)
    elif loader is None:
        raise VrwkvError(f"{path}: loading released .pth files is not implemented yet",
                         hint="use one of our output dirs (config.yaml + model.safetensors)")  # fmt: skip
    return loader(path, device=dev, dtype=dt).to(device=dev, dtype=dt).eval()


def _checkpoint_loader() -> Callable[..., VisualRWKV] | None:
    """`VisualRWKV.from_checkpoint`, or the checkpoint module's loader, when present."""
    from vrwkv_core.model.visual_rwkv import VisualRWKV

    loader = getattr(VisualRWKV, "from_checkpoint", None)
    if loader is None:
        try:
            from vrwkv_core.model.checkpoint import load_visual_rwkv as loader
        except ImportError:
            return None
    return loader


def context_length(spec: str | Path) -> int | None:
    """The training context of a model: config.yaml's data.ctx_len for our dirs, 2048 for
    released files (their training runs); None when unknown."""
    path = Path(str(spec)).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        import yaml

        try:
            data = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
            return int(data.get("data", {}).get("ctx_len", 2048))
        except (yaml.YAMLError, AttributeError, TypeError, ValueError):
            return None
    if path.suffix == ".pth" or not path.exists():
        return RELEASED_CTX_LEN
    return None


__all__ = ["context_length", "load_model", "load_model_dir", "resolve_device", "resolve_dtype"]
