"""The one reader of weight files, and the checks every loader shares.

`read_weights(path)` returns the flat name -> tensor dict of a `.safetensors` file, a sharded
safetensors set (`*.safetensors.index.json`, as Hugging Face writes them), or a `.pth` (any
other suffix). `.pth` files are read with `torch.load(weights_only=True)` (memory-mapped when
the file is a zip): a header check first, so a foreign file is named as such, and a pickle
with Python objects is refused without running anything. Each way a file can be wrong is
one CheckpointError line naming the file. `check_names` is the one strict accounting of
names and shapes (every tensor used, every parameter filled).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vrwkv_core.errors import CheckpointError

WORLD_VOCAB = 65536
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # legacy torch.save files start with a pickle protocol opcode
SHARD_INDEX = ".safetensors.index.json"


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file on CPU: `.safetensors`, a shard index, or a `.pth`."""
    path = Path(path)
    if path.name.endswith(SHARD_INDEX):
        return read_sharded(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_pth(path)


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth` (weights only, memory-mapped when the file is a zip).

    A foreign file, a truncated one, a pickle with Python objects (never executed) or
    a file that is not a flat dict of tensors is one CheckpointError line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file, not a PyTorch checkpoint")
    is_zip = head == _ZIP_MAGIC
    if not is_zip and head[0] != _PICKLE_PROTO:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then refuses anyway
            sd: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:  # torch.load raises UnpicklingError, RuntimeError, EOFError, KeyError...
        raise _load_error(path, err, is_zip) from None
    return _flat_tensors(sd, path)


def _load_error(path: Path, err: BaseException, is_zip: bool) -> CheckpointError:
    """One line for each way `torch.load(weights_only=True)` refuses a file."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return CheckpointError(
            f"{path}: refused: the file holds a pickled Python object ({found.group(1)}), not only tensors; "
            "nothing in it was run",
            hint="load only checkpoints from sources you trust; vrwkv reads tensors and never runs pickled code",
        )
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        op = re.search(r"Unsupported operand \d+", text)
        why = f" ({op.group(0).lower()})" if op else ""
        return CheckpointError(f"{path}: not a weights-only PyTorch checkpoint: its pickle was refused{why}; nothing in it was run")
    if is_zip or isinstance(err, EOFError):  # a zip header but unreadable: cut short or damaged
        return CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({first_line(err)})")
    return CheckpointError(f"{path}: not a PyTorch checkpoint ({type(err).__name__}: {first_line(err)})")


def _flat_tensors(sd: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict; unwraps one `state_dict`/`model`/`module` level."""
    if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    bad = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict of tensors ({len(bad)} non-tensor entries, e.g. {bad[0]!r})")
    return dict(sd)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({first_line(err)})") from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata header of a safetensors file ({} when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({first_line(err)})") from None


def read_sharded(index: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded safetensors set, from its index (`{"weight_map": {name: shard}}`);
    every shard must lie beside the index and every listed tensor be in its shard."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a safetensors shard index ({first_line(err)})") from None
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = index.parent / shard
        if Path(shard).name != shard:
            raise CheckpointError(f"{index}: shard {shard!r} is not a file name beside the index")
        out.update(read_safetensors(path))
    missing = [name for name in weight_map if name not in out]
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} listed tensors are in no shard, e.g. {missing[0]}")
    return out


def check_names(expected: Mapping[str, tuple], got: Mapping[str, tuple], source: str, what: str = "the model") -> None:
    """Strict accounting of name -> shape maps (every tensor used, every parameter filled,
    every shape right): one error line listing the missing, unexpected and wrong-shaped names."""
    missing = [n for n in expected if n not in got]
    unexpected = [n for n in got if n not in expected]
    wrong = [f"{n} {tuple(got[n])} != {tuple(s)}" for n, s in expected.items() if n in got and tuple(got[n]) != tuple(s)]

    def few(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

    problems = [f"{len(names)} {label}: {few(names)}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if names]  # fmt: skip
    if problems:
        raise CheckpointError(f"{source}: weights do not fit {what}: " + "; ".join(problems))


def check_vocab(rows: int, source: str) -> None:
    """The World tokenizer has 65536 ids; any other embedding is a checkpoint we cannot use."""
    if rows != WORLD_VOCAB:
        raise CheckpointError(
            f"{source}: vocab size {rows}, the World tokenizer needs {WORLD_VOCAB}",
            hint="vrwkv runs RWKV World models (rwkv_vocab_v20230424); this checkpoint has another tokenizer",
        )


def lm_part(sd: Mapping[str, torch.Tensor], prefix: str = "rwkv.") -> dict[str, torch.Tensor]:
    """The LM tensors of a VisualRWKV state dict, without their prefix."""
    return {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
