"""The reference runners: the `rwkv` package (PyPI), an independent RWKV implementation that the
benches time ours against and the parity tests take their reference logits from.

- RWKV-7 runs in this process (`load_rwkv7_pkg`): the package reads RWKV_V7_ON at its
  first import, so it is set before that (and the package's RWKV-6 path is then unusable here);
- RWKV-6 runs in a subprocess without RWKV_V7_ON (`rwkv_pkg_run`), with RWKV_JIT_ON=0,
  RWKV_CUDA_ON=0 and strategy "cpu fp32".
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch


def load_rwkv7_pkg(path: Path) -> Any:
    """The `rwkv` package's RWKV-7 on `path` (cpu fp32), or None if it is not installed.

    RWKV_V7_ON must be set before its first import; its loader prints, so stdout is muted.
    """
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from rwkv.model import RWKV

            return RWKV(model=str(path)[: -len(".pth")], strategy="cpu fp32")
    except ImportError:
        return None


def decode_pkg(pkg: Any, state: list[torch.Tensor], n: int) -> None:
    """The same with the rwkv package (which updates its state list in place: copy it)."""
    state = [s.clone() for s in state]
    tok = 0
    for _ in range(n):
        out, state = pkg.forward(tok, state)
        tok = int(out.argmax())


_PKG_SCRIPT = r"""
import json, sys, time
import torch
args = json.load(open(sys.argv[1]))
torch.set_num_threads(args["threads"])
from rwkv.model import RWKV
model = RWKV(model=args["model"], strategy="cpu fp32")
prompt, steps = args["prompt"], args["steps"]
out = {}
with torch.no_grad():
    if args["timing"]:
        model.forward(prompt[:16], None)
        best = float("inf")
        for _ in range(args["repeats"]):
            t0 = time.perf_counter(); model.forward(prompt, None); best = min(best, time.perf_counter() - t0)
        out["prefill_s"] = best
    logits, state = model.forward(prompt, None, full_output=args["full_output"])
    logits = logits.view(-1, logits.shape[-1])
    seq = [logits.clone()]
    tokens = []
    tok = int(logits[-1].argmax())
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens.append(tok)
        o, state = model.forward([tok], state)
        seq.append(o.view(1, -1).clone())
        tok = int(o.argmax())
    out["decode_s"] = time.perf_counter() - t0
out["tokens"] = tokens
if args["save_logits"]:
    torch.save({"prefill": seq[0], "steps": torch.cat(seq[1:]) if steps else None}, args["out"])
json.dump(out, open(args["out"] + ".json", "w"))
"""


def rwkv_pkg_run(
    path: str | Path,
    prompt: Sequence[int],
    steps: int,
    threads: int = 2,
    timing: bool = False,
    repeats: int = 1,
    full_output: bool = True,
    save_logits: bool = True,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Runs the `rwkv` package (x060, cpu fp32) on a `.pth` in a subprocess: a prefill of
    `prompt`, then `steps` greedy single-token steps. Returns {"tokens": the greedy ids fed,
    "prefill": logits [T or 1, V], "steps": logits [steps, V], "prefill_s", "decode_s"}.

    Raises ImportError when the package is missing, RuntimeError when the run fails.
    """
    if importlib.util.find_spec("rwkv") is None:
        raise ImportError("the `rwkv` package is not installed (pip install rwkv)")
    path = Path(path)
    if path.suffix != ".pth":
        raise ValueError(f"{path}: the rwkv package loads `.pth` files")
    env = {k: v for k, v in os.environ.items() if k != "RWKV_V7_ON"}
    env.update(RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.pt")
        args = {"model": str(path)[: -len(".pth")], "prompt": list(map(int, prompt)), "steps": steps,
                "threads": threads, "timing": timing, "repeats": repeats, "full_output": full_output,
                "save_logits": save_logits, "out": out}  # fmt: skip
        (Path(tmp) / "args.json").write_text(json.dumps(args))
        (Path(tmp) / "run.py").write_text(_PKG_SCRIPT)
        proc = subprocess.run([sys.executable, str(Path(tmp) / "run.py"), str(Path(tmp) / "args.json")],
                              env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError("rwkv package run failed: " + " | ".join(tail))
        result: dict[str, Any] = json.loads(Path(out + ".json").read_text())
        if save_logits:
            result.update(torch.load(out, weights_only=True))
    return result
