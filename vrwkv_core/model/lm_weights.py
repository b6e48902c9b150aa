"""What the RWKV language models (RWKV-7 and RWKV-6) share: weights I/O and a base class.

Both LMs keep the official RWKV-LM names, so one reader, one strict name check, one
"assign the tensors to a meta-device model" path and one `RWKVLanguageModel` base (layout
and construction, forward input checks and output, loading, saving, zero state, CPU inference
layout) serve both; each model keeps its blocks, init and block loop.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from vrwkv_core.errors import CheckpointError


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth` (torch.load, weights_only, mmap when the format allows) or a
    `.safetensors` file, on CPU; CheckpointError if the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # legacy (non-zip) .pth files cannot be mapped
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # unpickling, zip and safetensors errors alike
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read weights ({first})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return dict(sd)


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


def assign_weights(
    model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, what: str,
    device: torch.device | str | None, dtype: torch.dtype | None,
) -> nn.Module:
    """Fills a meta-device LM with `sd` strictly; dtype None: bf16 on CUDA, fp32 elsewhere.

    Tensors already in the target dtype and device are used as they are (no copy, so an
    mmap'd file stays mapped).
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_names(expected, {name: tuple(t.shape) for name, t in sd.items()}, source, f"an {what} model")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tensors = {}
    for name, t in sd.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: {name} has dtype {t.dtype}, expected a float tensor")
        tensors[name] = t.to(device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.cfg = replace(model.cfg, checkpoint=source if source != "<state dict>" else None)
    return model.eval()


def save_lm(model: nn.Module, path: str | Path, version: str) -> None:
    """Writes an LM as safetensors in the official layout (atomic), dims in metadata."""
    from safetensors.torch import save_file

    from vrwkv_core.fsutil import atomic_path

    tensors = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()}
    meta = {"format": f"vrwkv-rwkv{version[2]}", "version": version, "n_layer": str(model.n_layer),
            "n_embd": str(model.n_embd), "head_size": str(model.head_size),
            "vocab_size": str(model.vocab_size), "dim_ffn": str(model.dim_ffn)}  # fmt: skip
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


LOGITS_MODES = ("all", "last", "hidden")


class RWKVLanguageModel(nn.Module):
    """Base of RWKV7 and RWKV6: subclasses set `version`, `label` and `config_from_state_dict`,
    build their blocks through `_build` and run them between `_input` and `_output`."""

    version = ""
    label = ""

    def _build(self, cfg: Any, lora: Any, dim_ffn: int, make_block: Any, init: bool) -> None:
        """The layout both share: emb, blocks, ln_out, head, built on the meta device, then
        materialised and initialised on the default device unless `init` is False."""
        from vrwkv_core.model.rwkv7 import Linear

        if cfg.version != self.version:
            raise ValueError(f"{type(self).__name__} needs model.rwkv.version {self.version}, got {cfg.version!r}")
        if cfg.n_embd % cfg.head_size:
            raise ValueError(f"n_embd {cfg.n_embd} is not a multiple of head_size {cfg.head_size}")
        self.cfg = replace(cfg, dim_ffn=dim_ffn)
        self.lora = lora
        self.n_layer, self.n_embd, self.head_size = cfg.n_layer, cfg.n_embd, cfg.head_size
        self.vocab_size, self.dim_ffn = cfg.vocab_size, dim_ffn
        self.grad_checkpoint = False
        with torch.device("meta"):
            # An explicit weight skips nn.Embedding's normal_ init: normal_ on the meta device
            # imports torch._dynamo, ~1 s added to every model build.
            self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.empty(cfg.vocab_size, cfg.n_embd))
            self.blocks = nn.ModuleList(make_block(self.cfg, i, lora, dim_ffn) for i in range(cfg.n_layer))
            self.ln_out = nn.LayerNorm(cfg.n_embd)
            self.head = Linear(cfg.n_embd, cfg.vocab_size)
        device = torch.get_default_device()
        if init and device.type != "meta":
            self.to_empty(device=device)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def _input(self, idx: torch.Tensor | None, embeds: torch.Tensor | None, state: Any, logits: str) -> torch.Tensor:
        """Checks the forward arguments and returns the input embeddings [B,T,C]."""
        if (idx is None) == (embeds is None):
            raise ValueError("pass exactly one of idx [B,T] or embeds [B,T,C]")
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be one of {', '.join(LOGITS_MODES)}, got {logits!r}")
        x = self.emb(idx) if idx is not None else embeds.to(self.emb.weight.dtype)
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"expected ids [B,T] or embeds [B,T,{self.n_embd}], got {tuple(x.shape)}")
        if state is not None and (state.batch_size != x.shape[0] or state.n_layer != self.n_layer):
            raise ValueError(
                f"state has batch {state.batch_size} and {state.n_layer} layers; input has batch "
                f"{x.shape[0]}, model {self.n_layer} layers"
            )
        return x

    def _checkpointing(self, one: bool) -> bool:
        """Whether blocks recompute their activations in backward (training, T > 1)."""
        return self.grad_checkpoint and self.training and torch.is_grad_enabled() and not one

    def _output(self, x: torch.Tensor, one: bool, logits: str, layers: list[tuple]) -> tuple[torch.Tensor, Any]:
        """ln_out + head on the blocks' output (x [B,C] when `one`), and the new state from the
        per-layer (att_shift, wkv, ffn_shift) triples."""
        from vrwkv_core.model.state import RWKVState

        new_state = RWKVState(*(list(parts) for parts in zip(*layers)))
        if one:
            x = x.unsqueeze(1)
        if logits == "last":
            x = x[:, -1:]
        x = self.ln_out(x)
        if logits == "hidden":
            return x, new_state
        return self.head(x), new_state

    @staticmethod
    def config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> tuple[Any, Any]:
        raise NotImplementedError

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        source: str = "<state dict>",
    ) -> Any:
        """A model holding exactly the tensors of an official-layout state dict (strict).

        dtype None: bfloat16 on CUDA, float32 elsewhere. Tensors already in the target
        dtype and device are used as they are (no copy, so an mmap'd file stays mapped).
        """
        cfg, lora = cls.config_from_state_dict(sd, source)
        return assign_weights(cls(cfg, lora, init=False), sd, source, cls.label, device, dtype)  # type: ignore[call-arg]

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Any:
        """Loads an official RWKV World `.pth` (any float dtype) or a `.safetensors` from `save`."""
        return cls.from_state_dict(read_weights(path), device=device, dtype=dtype, source=str(path))

    def save(self, path: str | Path) -> None:
        """Writes the weights as safetensors in the official layout (atomic), dims in metadata."""
        save_lm(self, path, self.version)

    def zero_state(self, batch: int = 1) -> Any:
        """An all-zero state on the model's device (same as passing state=None)."""
        from vrwkv_core.model.state import RWKVState

        return RWKVState.zeros(self, batch)

    def optimize_for_inference(self) -> Any:
        """Lays the matrices out for fast CPU decoding (returns self).

        fp32: the big matrices become column-major (same values and shapes, transposed
        storage), which makes single-token gemv ~1.3x faster and prefill matmuls ~10%
        slower. bf16: each big matrix gets a oneDNN-packed copy (one more bf16 copy of
        the weights in memory) that no-grad forwards use. Training afterwards still works.
        """
        for m in self.modules():
            if m is not self and callable(getattr(m, "optimize_for_inference", None)):
                m.optimize_for_inference()
        return self
