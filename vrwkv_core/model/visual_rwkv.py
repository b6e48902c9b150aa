"""VisualRWKV: vision towers + projector + an RWKV LM (RWKV-7 or RWKV-6), joined by image-token splicing.

Token ids carry `IMAGE_TOKEN_ID` (65535) placeholders, `tokens_per_image` per image.
`forward` embeds the ids (placeholders read row 0, then get overwritten), encodes the
batch's images, and replaces the placeholders of each sample, in order, with that
sample's projected image features. Images are consumed in batch order: sample b owns
`image_counts[b]` consecutive images (zero allowed). A sample whose placeholder count
is not `image_counts[b] * tokens_per_image` is an error naming the sample, unless
`partial_images` allows its last image to be cut short (the original v7.00 truncation keeps
the first ctx_len tokens even inside an image: that image's first rows are spliced).
`BLANK_IMAGE_TOKEN_ID` (65534) rows are zero vectors: v6.0 feeds a text-only sample as one
image of zero rows before its text (`Family.blank_image_rows`); like image rows, all but the
last of each run are read backwards on odd layers.

    model = VisualRWKV(recipe.model)
    images = model.image_processor.batch([pil])           # {tower: [1, 3, S, S]}
    logits, state = model.prefill(ids, images)            # logits [B, V]; state continues in RNN mode
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vrwkv_core.config import ModelSection
from vrwkv_core.errors import DataError
from vrwkv_core.model.families import Family, family
from vrwkv_core.model.projector import build_projector
from vrwkv_core.model.rwkv.state import RWKVState
from vrwkv_core.model.vision import ImageProcessor, VisionTowers
from vrwkv_core.model.vision.clip import clip_patch_spans
from vrwkv_core.tokenizer import BLANK_IMAGE_TOKEN_ID, IMAGE_TOKEN_ID

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe

__all__ = ["BLANK_IMAGE_TOKEN_ID", "IMAGE_TOKEN_ID", "VisualRWKV", "splice_image_features"]


def splice_image_features(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    features: torch.Tensor | None,
    image_counts: torch.Tensor,
    tokens_per_image: int,
    partial_images: bool = False,
) -> torch.Tensor:
    """Replaces each sample's placeholder rows with its images' features, in order.

    embeds [B, T, C], input_ids [B, T], features [N, P, C] or None (N = image_counts.sum(),
    P = tokens_per_image), image_counts [B]. Returns a new tensor; gradients flow to
    embeds and features.
    """
    if features is not None and features.shape[1] != tokens_per_image:
        raise ValueError(f"features have {features.shape[1]} tokens per image, expected {tokens_per_image}")
    mask = input_ids == IMAGE_TOKEN_ID  # [B, T]
    found = mask.sum(dim=1).tolist()
    counts = [int(c) for c in image_counts.tolist()]
    if len(counts) != input_ids.shape[0]:
        raise ValueError(f"image_counts has {len(counts)} entries for a batch of {input_ids.shape[0]}")
    n_images = features.shape[0] if features is not None else 0
    if sum(counts) != n_images:
        raise DataError(f"image_counts {counts} add up to {sum(counts)} images, but the batch has {n_images}")
    keep = []
    for b, (n_found, n_img) in enumerate(zip(found, counts)):
        keep += [True] * n_found + [False] * (n_img * tokens_per_image - n_found)
        if partial_images and n_img and (n_img - 1) * tokens_per_image < n_found <= n_img * tokens_per_image:
            continue
        if n_found != n_img * tokens_per_image:
            raise DataError(
                f"sample {b}: {n_found} image placeholder tokens, but {n_img} image(s) x "
                f"{tokens_per_image} tokens = {n_img * tokens_per_image}"
            )
    if n_images == 0:
        return embeds
    # Row-major nonzero order is sample-major then position, which is the order the
    # flattened features [N*P, C] come in: sample b's images are consecutive.
    rows, cols = mask.nonzero(as_tuple=True)
    flat = features.reshape(-1, features.shape[-1])
    if partial_images:
        flat = flat[torch.tensor(keep, device=flat.device)]
    return embeds.index_put((rows, cols), flat.to(embeds.dtype))


class VisualRWKV(nn.Module):
    """The whole model: `.rwkv` (the family's LM: RWKV7 or RWKV6), `.vit` (VisionTowers), `.proj`, `.image_processor`.

    State-dict names follow the released files: `rwkv.*`, `vit.<tower>_featurizer.*`,
    `proj.*` (see `checkpoint.formats` for the key maps of released files).
    """

    def __init__(self, model_cfg: ModelSection) -> None:
        super().__init__()
        self.config = model_cfg
        self.tokens_per_image = model_cfg.tokens_per_image
        self.rwkv = family(model_cfg.rwkv.version).lm_class(model_cfg.rwkv)
        self.vit = VisionTowers(model_cfg.vision, model_cfg.tokens_per_image)
        self.proj = build_projector(model_cfg.projector.type, self.vit.embed_dim, model_cfg.rwkv.n_embd)
        self.image_processor = ImageProcessor(model_cfg.vision)

    @classmethod
    def from_checkpoint(
        cls, path_or_dir: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "VisualRWKV":
        """Loads a released v7.00 `.pth`, one of our model dirs, or `hub:NAME` (strictly)."""
        from vrwkv_core.checkpoint.load import load_visual_rwkv  # the one way into checkpoint/

        return load_visual_rwkv(path_or_dir, device, dtype)

    def save_pretrained(self, out_dir: str | Path, recipe: "Recipe") -> Path:
        """Writes model.safetensors + config.yaml (the recipe) to out_dir, atomically."""
        from vrwkv_core.checkpoint.ours import save_pretrained  # the one way into checkpoint/

        return save_pretrained(self, out_dir, recipe)

    @property
    def family(self) -> Family:
        """The LM family (`model.families.FAMILIES[config.rwkv.version]`)."""
        return family(self.config.rwkv.version)

    @property
    def device(self) -> torch.device:
        return self.rwkv.emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.rwkv.emb.weight.dtype

    def encode_images(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """{tower: [N, 3, S, S]} -> projected features [N, tokens_per_image, n_embd].

        Frozen towers run without autograd; the projector always runs with it.
        """
        feats = self.vit(images)  # [N, P, D_v]
        p = next(self.proj.parameters())
        return self.proj(feats.to(device=p.device, dtype=p.dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        images: dict[str, torch.Tensor] | None = None,
        image_counts: torch.Tensor | None = None,
        partial_images: bool = False,
    ) -> torch.Tensor:
        """The LM input [B, T, C]: token embeddings with image features spliced in, zeros on blank rows."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        input_ids = input_ids.to(self.device)
        mask = input_ids == IMAGE_TOKEN_ID
        blank = input_ids == BLANK_IMAGE_TOKEN_ID
        # zeros on blank rows without asking whether there are any (no host sync per forward)
        embeds = self.rwkv.emb(input_ids.masked_fill(mask | blank, 0)).masked_fill(blank.unsqueeze(-1), 0.0)
        n_images = _count_images(images)
        if n_images == 0 and not bool(mask.any()):
            return embeds
        if image_counts is None:
            image_counts = self._infer_counts(mask, n_images)
        features = self.encode_images(images) if n_images else None
        counts = torch.as_tensor(image_counts).view(-1)
        return splice_image_features(embeds, input_ids, features, counts, self.tokens_per_image, partial_images)

    def _infer_counts(self, mask: torch.Tensor, n_images: int) -> torch.Tensor:
        """Images per sample from the placeholder counts (when the caller gives none)."""
        found = mask.sum(dim=1)
        if mask.shape[0] == 1:
            return torch.tensor([n_images])
        bad = (found % self.tokens_per_image).nonzero()
        if len(bad):
            b = int(bad[0])
            raise DataError(
                f"sample {b}: {int(found[b])} image placeholder tokens is not a multiple of "
                f"tokens_per_image {self.tokens_per_image}"
            )
        return (found // self.tokens_per_image).cpu()

    def forward(
        self,
        input_ids: torch.Tensor,
        images: dict[str, torch.Tensor] | None = None,
        image_counts: torch.Tensor | None = None,
        state: RWKVState | None = None,
        logits: str = "all",
        backend: str | None = None,
        partial_images: bool = False,
    ) -> tuple[torch.Tensor, RWKVState]:
        """ids [B, T] with placeholders + images {tower: [N, 3, S, S]} + image_counts [B] -> LM output.

        `logits` as in `RWKV7.forward` ("all" [B,T,V], "last" [B,1,V], "hidden" [B,T,C]).
        image_counts may be left out when the batch has one sample or when every
        sample's placeholders are a whole number of images.
        """
        embeds = self.embed(input_ids, images, image_counts, partial_images)
        extra = {}
        if self.family.reverse_image_rows:  # v6.0: odd layers scan each image's patch rows backwards
            ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
            ids = ids.masked_fill(ids == BLANK_IMAGE_TOKEN_ID, IMAGE_TOKEN_ID)  # blank rows turn like image rows
            extra["reverse_spans"] = clip_patch_spans(ids, IMAGE_TOKEN_ID, self.tokens_per_image)
        return self.rwkv(embeds=embeds, state=state, logits=logits, backend=backend, **extra)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        images: dict[str, torch.Tensor] | None = None,
        image_counts: torch.Tensor | None = None,
        state: RWKVState | None = None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, RWKVState]:
        """Runs a prompt (from `state`) for chat/eval: (logits of the last token [B, V], state)."""
        out, state = self.forward(input_ids, images, image_counts, state=state, logits="last", backend=backend)
        return out[:, -1], state


def _count_images(images: dict[str, torch.Tensor] | None) -> int:
    if not images:
        return 0
    if not isinstance(images, dict):
        raise TypeError(f"images must be a dict tower -> [N, 3, S, S], got {type(images).__name__}")
    return int(next(iter(images.values())).shape[0])
