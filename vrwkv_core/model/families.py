"""The language-model families: one entry per RWKV version, the only place that tells them apart.

    fam = family(recipe.model.rwkv.version)       # FAMILIES["x070"] or FAMILIES["x060"]
    lm = fam.lm_class(cfg)                        # RWKV7 / RWKV6
    fam = family_of_state_dict(sd)                # an official-layout LM state dict, by its tensors

Each entry names the LM class (its blocks, init, forward and `config_from_state_dict`), its
default channel-mix width, the WKV op it runs, the released-file key map registered under
its name in `vrwkv_core.checkpoint.formats`, and the prompt and vision defaults of the
VisualRWKV release built on it. Adding a family (an RWKV-8 language side) is one entry here,
its module under `model/rwkv/`, and its key map under `checkpoint/formats/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from vrwkv_core.config import RWKV_VERSIONS
from vrwkv_core.errors import CheckpointError, RecipeError
from vrwkv_core.kernels import wkv6, wkv7
from vrwkv_core.model.rwkv.layers import RWKVLanguageModel
from vrwkv_core.model.rwkv.rwkv6 import RWKV6, default_dim_ffn, is_rwkv6_state_dict
from vrwkv_core.model.rwkv.rwkv7 import RWKV7


@dataclass(frozen=True)
class Family:
    """What differs between LM families, as data."""

    version: str
    """`model.rwkv.version`, also the RWKV-LM file tag (RWKV-x070-..., RWKV-x060-...)."""
    lm_class: type[RWKVLanguageModel]
    default_dim_ffn: Callable[[int], int]
    """Channel-mix width for n_embd when `model.rwkv.dim_ffn` is null."""
    wkv: Callable
    """The WKV op (`kernels.wkv7` / `kernels.wkv6`)."""
    detect: Callable[[Mapping[str, object]], bool]
    """True for an official-layout LM state dict (no `rwkv.` prefix) of this family."""
    prompt_style: str
    """Eval/chat prompt style of its VisualRWKV release: v7 (v7.00) or v6 (v6.0)."""
    image_position: str
    """Where its release puts the image in chat/eval prompts (first / middle)."""
    reverse_image_rows: bool
    """v6.0's bidirectional scan: odd layers read each image's patch rows backwards."""
    prefill_pad: int = 0
    """Its release pads the first prefill of a conversation to a multiple of this with token 261
    (v7.00's forward did, for its kernel's chunk length); 0: no pad."""
    original_truncation: str = "head"
    """Its original's cut of long training samples (`data.truncation: original`): v7.00 `head`, v6.0 `tail_if_unlabelled`."""
    blank_image_rows: bool = False
    """Its original feeds a text-only sample (training and eval) as one image of zero rows
    (`tokens_per_image` blank placeholders, reversed on odd layers like image rows) before the text (v6.0)."""
    align_images: bool = False
    """Its original left-pads every training sample of a batch with token 0 so that all images
    (and blank rows) start at the same position (v6.0)."""

    @property
    def label(self) -> str:
        return self.lm_class.label

    def config_from_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> tuple:
        """(RWKVSection, LoRA widths) of an official-layout LM state dict of this family."""
        return self.lm_class.config_from_state_dict(sd, source)

    def dim_ffn(self, n_embd: int, dim_ffn: int | None = None) -> int:
        """The channel-mix width a config means (`dim_ffn` null: the family default)."""
        return dim_ffn or self.default_dim_ffn(n_embd)


def _is_rwkv7_state_dict(sd: Mapping[str, object]) -> bool:
    return "blocks.0.att.r_k" in sd


FAMILIES: dict[str, Family] = {
    "x070": Family("x070", RWKV7, lambda c: 4 * c, wkv7, _is_rwkv7_state_dict,
                   prompt_style="v7", image_position="first", reverse_image_rows=False,
                   original_truncation="head", prefill_pad=16),
    "x060": Family("x060", RWKV6, default_dim_ffn, wkv6, is_rwkv6_state_dict,
                   prompt_style="v6", image_position="middle", reverse_image_rows=True,
                   original_truncation="tail_if_unlabelled", prefill_pad=0, blank_image_rows=True, align_images=True),
}
assert tuple(FAMILIES) == RWKV_VERSIONS, "config.RWKV_VERSIONS lists the families"


def family(version: str) -> Family:
    """The family of `model.rwkv.version`; a recipe error for an unknown one."""
    if version not in FAMILIES:
        raise RecipeError(f"model.rwkv.version: unknown {version!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[version]


def family_of_state_dict(sd: Mapping[str, object], source: str = "<state dict>") -> Family:
    """The family of an official-layout LM state dict (no prefix), by its tensors; RWKV-7
    when none matches (its config reader then names what is missing)."""
    for fam in FAMILIES.values():
        if fam.detect(sd):
            return fam
    if not sd:
        raise CheckpointError(f"{source}: no tensors")
    return FAMILIES["x070"]


def lm_config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> tuple:
    """(RWKVSection, LoRA widths) of an RWKV-6 or RWKV-7 LM state dict, by its tensors."""
    return family_of_state_dict(sd, source).config_from_state_dict(sd, source)
