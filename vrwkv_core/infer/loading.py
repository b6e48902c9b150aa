"""Resolve a `--model` argument (our output dir, a released .pth, a registry name) to a model.

- A directory with `config.yaml` + `model.safetensors` (what a training stage writes),
  or a `.pth` / `.safetensors` file: `vrwkv_core.checkpoint.load_visual_rwkv`
  (strict; built on the meta device, the file's tensors assigned without a random init).
- Anything else goes through `vrwkv_core.hub.resolve` (offline and absent: a DownloadError
  naming the `vrwkv download NAME` command; `download=True` fetches it).

Device "auto" is CUDA when available, else CPU; dtype "auto" is bf16 on CUDA, fp32 on CPU.
On CPU the language model gets `optimize_for_inference()` (its decoding layout: ~1.2x
faster fp32 decoding, same values; saving and training still work). `quant` (fp16, int8,
int4) quantizes the language model's weights (`vrwkv_core.infer.quantize`); a dir written
by `vrwkv export --quant` loads already quantized (its format wins; a different `quant` is
an error).

    vlm = load_model("out/tiny/finetune", device="cpu")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vrwkv_core.checkpoint import load_visual_rwkv
from vrwkv_core.checkpoint.adapters import apply_adapter
from vrwkv_core.errors import CheckpointError, VrwkvError
from vrwkv_core.hub import resolve
from vrwkv_core.model.rwkv.state import RWKVState
from vrwkv_core.infer.quantize import quantize

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


def load_model(
    spec: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    download: bool = False,
    wkv_backend: str | None = None,
    adapter: str | Path | None = None,
    state: str | Path | None = None,
    merge_adapter: bool = False,
    quant: str | None = None,
) -> VisualRWKV:
    """A ready-to-run VisualRWKV (eval mode) for a dir, a checkpoint file or a registry name;
    `wkv_backend` overrides the model's `model.rwkv.wkv_backend` (None keeps it).

    `adapter`: a peft run dir trained on this model (checked by sha256), applied without
    merging unless `merge_adapter`; `state`: a state file (`state.safetensors`) that every
    prompt starts from; `quant` (fp16, int8, int4; None: as stored) quantizes the language
    model's weights."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(str(spec)).expanduser()
    if not path.exists():
        path = Path(resolve(str(spec), download=download))
        if not path.exists():
            raise CheckpointError(f"{spec}: no such model directory or file",
                                  hint="pass an output dir (config.yaml + model.safetensors), a .pth, or a registry name")  # fmt: skip
    vlm = load_visual_rwkv(path, device=dev, dtype=dt).eval()
    if adapter is not None:
        apply_adapter(vlm, adapter, base=path, merge=merge_adapter)
    elif merge_adapter:
        raise VrwkvError("--merge-adapter needs --adapter")
    if state is not None:
        _use_state(vlm, Path(state))
    if wkv_backend is not None:
        try:
            vlm.rwkv.use_wkv_backend(wkv_backend)
        except ValueError as err:
            raise VrwkvError(f"--wkv-backend: {err}") from None
    if dev.type == "cpu":
        vlm.rwkv.optimize_for_inference()
    stored = getattr(vlm.rwkv, "quant", None)
    if quant is not None and stored is not None and quant != stored:
        raise VrwkvError(f"--quant {quant}: {spec} is stored quantized as {stored}", hint=f"use --quant {stored} or none")
    if quant is not None and stored is None:
        quantize(vlm, quant)
    return vlm


def _use_state(vlm: VisualRWKV, path: Path) -> None:
    """Prompts start from the state file at `path` (a state-tuning run's `state.safetensors`)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such state file", hint="a state-tuning run writes OUT_DIR/state.safetensors")
    try:
        vlm.rwkv.set_initial_state(RWKVState.load(path, device=vlm.device))
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def context_length(spec: str | Path) -> int | None:
    """The training context of a model: config.yaml's data.ctx_len for our dirs, 2048 for
    released files (their training runs); None when unknown."""
    path = Path(str(spec)).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        import yaml

        try:
            data = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
            return int(data.get("data", {}).get("ctx_len", 2048))
        except (yaml.YAMLError, AttributeError, TypeError, ValueError, OSError):  # incl. UnicodeDecodeError
            return None
    if path.suffix == ".pth" or not path.exists():
        return RELEASED_CTX_LEN
    return None


__all__ = ["context_length", "load_model", "resolve_device", "resolve_dtype"]
