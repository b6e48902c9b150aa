"""Building models whose weights come from somewhere: meta-device layouts filled by assignment,
and new VisualRWKVs from their parts (an RWKV World `.pth` plus tower files).

Models are built on the meta device and the file's tensors assigned (no random init, no
copy when dtype and device already match, so an mmap'd file stays mapped). Non-persistent
buffers, which no file holds, are recomputed by building their part on CPU
(`materialize_buffers`). `build_from_parts(recipe)` is the one way to start a new model:
training (`vrwkv pretrain` with no `init_from`) and tests both call it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
import torch.nn as nn

from vrwkv_core.checkpoint.formats.towers import load_tower_file
from vrwkv_core.checkpoint.tensors import check_names, check_vocab, lm_part, read_weights
from vrwkv_core.config import ModelSection, Recipe
from vrwkv_core.errors import CheckpointError
from vrwkv_core.hub import resolve
from vrwkv_core.model.families import family, family_of_state_dict, lm_config_from_state_dict
from vrwkv_core.model.projector import build_projector
from vrwkv_core.model.rwkv.layers import RWKVLanguageModel
from vrwkv_core.model.rwkv.quant import dense_view, finish_loading, is_quant_key, quantized_layout
from vrwkv_core.model.vision import build_featurizer, featurizer_attr
from vrwkv_core.model.visual_rwkv import VisualRWKV

ALIGN = 64  # bytes: what torch's CPU allocator gives every tensor


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied when its data is not 64-byte aligned. safetensors only aligns tensors to 8
    bytes inside the file, and MKL takes other code paths (other rounding) for unaligned
    matrices: the same weights must give the same logits however the file happened to lay
    them out. Tensors torch allocated, and zip `.pth` records, are aligned already (no copy)."""
    return t if t.device.type != "cpu" or t.data_ptr() % ALIGN == 0 else t.clone()


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
        if is_quant_key(name):  # codes and scales keep their stored dtypes; aligned, as torch's packed
            # int8 kernel reads them with aligned vector loads (a file-offset tensor crashed it)
            tensors[name] = aligned(t.to(device=device, dtype=expected_dtype(model, name)))
            continue
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: {name} has dtype {t.dtype}, expected a float tensor")
        t = t.to(device=device, dtype=dtype)
        # the embedding is only gathered from (no MKL product): left mmap'd, only the rows a
        # prompt uses become resident (65536 x 768 fp32 is 200 MB)
        tensors[name] = t if name == "emb.weight" else aligned(t)
    model.load_state_dict(tensors, strict=True, assign=True)
    if getattr(model, "quant", None):
        finish_loading(model)
    model.cfg = replace(model.cfg, checkpoint=source if source != "<state dict>" else None)
    return model.eval()


def expected_dtype(model: nn.Module, name: str) -> torch.dtype:
    """The dtype the (meta-built) model holds tensor `name` in."""
    module, leaf = name.rsplit(".", 1)
    return model.get_submodule(module)._buffers[leaf].dtype


def lm_from_state_dict(
    cls: type[RWKVLanguageModel], sd: Mapping[str, torch.Tensor], source: str = "<state dict>",
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> Any:
    """`RWKV7/RWKV6.from_state_dict`: an LM of class `cls` holding exactly `sd` (strict); a
    quantized state dict (from `save` of a quantized LM) loads as that quantized LM."""
    cfg, lora = cls.config_from_state_dict(dense_view(sd), source)
    model = cls(cfg, lora, init=False)  # type: ignore[call-arg]
    quantized_layout(model, {k: tuple(t.shape) for k, t in sd.items()})
    return assign_weights(model, sd, source, cls.label, device, dtype)


def lora_of(sd: Mapping[str, torch.Tensor], source: str, prefix: str = "rwkv.") -> Any:
    """LoRA widths of the LM tensors in `sd` (None when there is no LM to read them from)."""
    lm = dense_view(lm_part(sd, prefix))
    if "emb.weight" not in lm:
        return None
    return lm_config_from_state_dict(lm, source)[1]


def build_meta(model_cfg: ModelSection, lora: Any = None) -> VisualRWKV:
    """A VisualRWKV with every weight on the meta device; `lora` overrides the default widths."""
    with torch.device("meta"):
        model = VisualRWKV(model_cfg)
        if lora is not None and lora != model.rwkv.lora:
            model.rwkv = type(model.rwkv)(model_cfg.rwkv, lora, init=False)
    return model


def assign_state(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    materialize: bool = True,
) -> None:
    """Assigns `sd` (names already checked) to a meta-built model on `device`, floats cast to
    `dtype` (None keeps the file's); then recomputes non-persistent buffers (`model` must then
    be the whole VisualRWKV)."""
    device = torch.device(device)
    expected = model.state_dict()
    tensors = {}
    for name, t in sd.items():
        if is_quant_key(name):  # codes and scales keep their stored dtypes (aligned: see assign_weights)
            tensors[name] = aligned(t.to(device=device, dtype=expected[name].dtype))
            continue
        want_float = expected[name].is_floating_point()
        if want_float != t.is_floating_point():
            raise CheckpointError(f"{source}: {name} has dtype {t.dtype}, expected a {expected[name].dtype} tensor")
        tensors[name] = aligned(t.to(device=device, dtype=dtype if (dtype is not None and want_float) else t.dtype))
    model.load_state_dict(tensors, strict=True, assign=True)
    if materialize and device.type != "meta":
        materialize_buffers(model, device, dtype)
    lm = getattr(model, "rwkv", None)
    if lm is not None and getattr(lm, "quant", None) and device.type != "meta":
        finish_loading(lm)


def _rebuild_part(model: VisualRWKV, part: str) -> torch.nn.Module:
    """A freshly built copy (on CPU) of the model part that owns a buffer."""
    cfg = model.config
    with torch.device("cpu"):
        if part.startswith("vit.") and part.endswith("_featurizer"):
            return build_featurizer(part[len("vit."):-len("_featurizer")], cfg.vision)
        if part == "rwkv":
            return type(model.rwkv)(model.rwkv.cfg, model.rwkv.lora)
        if part == "proj":
            return build_projector(cfg.projector.type, model.vit.embed_dim, cfg.rwkv.n_embd)
        return VisualRWKV(cfg)


def _part_of(module_path: str) -> str:
    parts = module_path.split(".")
    if parts[0] == "vit" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0] if parts[0] in ("rwkv", "proj") else ""


def materialize_buffers(model: torch.nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
    """Non-persistent buffers left on meta (no file holds them, e.g. timm's rope tables) are
    taken from a CPU build of their part; any other meta tensor left is an internal error."""
    device = torch.device(device)
    rebuilt: dict[str, torch.nn.Module] = {}
    for path, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            part = _part_of(path)
            if part not in rebuilt:
                rebuilt[part] = _rebuild_part(model, part)  # type: ignore[arg-type]
            sub = path if not part else path[len(part) + 1:]  # "" when the part itself owns it
            value = getattr(rebuilt[part].get_submodule(sub), name)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            module._buffers[name] = value.to(device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"internal: {len(left)} tensors still on the meta device after loading, e.g. {left[0]}")


def _to_empty(module: torch.nn.Module) -> None:
    """Uninitialised CPU storage for a meta module's weights, to be filled by load_state_dict;
    non-persistent buffers stay on meta so `materialize_buffers` computes them."""
    kept = [(m, n) for m in module.modules() for n in m._non_persistent_buffers_set if m._buffers.get(n) is not None]
    module.to_empty(device="cpu")
    for m, n in kept:
        m._buffers[n] = torch.empty_like(m._buffers[n], device="meta")


def build_from_parts(recipe: Recipe) -> VisualRWKV:
    """A new VisualRWKV (float32, CPU) from `model.rwkv.checkpoint` (an RWKV World `.pth`; null:
    a random LM) plus `model.vision.checkpoints` tower files; towers without a file and the
    projector are freshly initialised (seed the RNG first for a reproducible init).

    The LM file must match the recipe's dims and have the World vocab; tower files go
    through timm's checkpoint filters (names mapped, position embeddings resampled).
    """
    m = recipe.model
    if not m.rwkv.checkpoint:  # a random LM; towers from their files where the recipe names them
        model = VisualRWKV(m)
        for name in m.vision.towers:
            spec = getattr(m.vision.checkpoints, name, None)
            if spec:
                load_tower_file(model.vit, name, resolve(spec))
        return model
    lm_path = resolve(m.rwkv.checkpoint)
    lm = read_weights(lm_path)
    source = str(lm_path)
    if "emb.weight" in lm:
        check_vocab(lm["emb.weight"].shape[0], source)
    fam, file_fam = family(m.rwkv.version), family_of_state_dict(lm, source)
    file_cfg, lora = file_fam.config_from_state_dict(lm, source)
    want = replace(m.rwkv, dim_ffn=fam.dim_ffn(m.rwkv.n_embd, m.rwkv.dim_ffn))
    if file_fam is not fam:
        raise CheckpointError(f"{source}: an {file_fam.version} checkpoint, but model.rwkv.version is {m.rwkv.version}")
    for key in ("n_layer", "n_embd", "head_size", "vocab_size", "dim_ffn"):
        if getattr(file_cfg, key) != getattr(want, key):
            raise CheckpointError(
                f"{source}: has {key} {getattr(file_cfg, key)}, but the recipe's model.rwkv.{key} is {getattr(want, key)}",
                hint="set model.rwkv.n_layer/n_embd/head_size to the checkpoint's, or pick the checkpoint of this size",
            )
    model = build_meta(m, lora)
    check_names({k: tuple(t.shape) for k, t in model.rwkv.state_dict().items()},
                {k: tuple(t.shape) for k, t in lm.items()}, source)  # fmt: skip
    assign_state(model.rwkv, lm, source, "cpu", torch.float32, materialize=False)  # done once at the end
    del lm
    for name in m.vision.towers:
        spec = getattr(m.vision.checkpoints, name, None)
        if spec:
            _to_empty(model.vit.featurizer(name))
            load_tower_file(model.vit, name, resolve(spec))
        else:
            with torch.device("cpu"):
                setattr(model.vit, featurizer_attr(name), build_featurizer(name, m.vision))
    model.vit.freeze(m.vision.freeze)
    with torch.device("cpu"):
        model.proj = build_projector(m.projector.type, model.vit.embed_dim, m.rwkv.n_embd)
    materialize_buffers(model, "cpu", None)
    return model
