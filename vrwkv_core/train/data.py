"""The stage's data: a train/validation split of the records, sharded resumable loaders."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from vrwkv_core.data.dataset import ResumableSampler, VisionLanguageDataset, collate
from vrwkv_core.data.order import OriginalOrderSampler
from vrwkv_core.model.families import family
from vrwkv_core.tokenizer import default_tokenizer

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/validation split of range(n); validation is empty for tiny data or 0."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    n_val = round(n * val_fraction) if n > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n > 1 else 0), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


class StageData(pl.LightningDataModule):
    """Loaders over data.jsonl for one stage; the sampler position is saved in checkpoints."""

    def __init__(self, recipe: "Recipe", stage: str, paths: dict[str, Path], image_processor: Callable,
                 tokens_per_image: int, rejects_path: Path | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.stage = getattr(recipe, stage)
        original = recipe.data.truncation == "original"
        fam = family(recipe.model.rwkv.version)
        self.dataset = VisionLanguageDataset(
            paths["records"], paths["images"], default_tokenizer(), image_processor,
            tokens_per_image, recipe.data.ctx_len, skip_bad_images=recipe.data.skip_bad_images,
            image_position=self.stage.image_position or recipe.model.image_position, rejects_path=rejects_path,
            truncation=fam.original_truncation if original else "whole_images", blank_image=fam.blank_image_rows,
        )  # fmt: skip
        # The original pads every sample to ctx_len (L2Wrap's 1/(B*T) and its padding rows see it).
        self.collate = partial(collate, pad_to=recipe.data.ctx_len if original else None, align_images=fam.align_images)
        self.train_idx, self.val_idx = split_indices(len(self.dataset), recipe.data.val_fraction, self.stage.seed)
        self.sampler: Any = None
        self._pending_state: dict | None = None

    def _loader(self, subset: Subset, sampler: Any, shuffle: bool = False) -> DataLoader:
        workers = self.recipe.data.num_workers
        return DataLoader(
            subset, batch_size=self.stage.micro_batch, sampler=sampler, collate_fn=self.collate,
            num_workers=workers, persistent_workers=workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.recipe.data.order == "original":
            per_rank = self.stage.max_steps * self.stage.grad_accum * self.stage.micro_batch
            self.sampler = OriginalOrderSampler(len(self.train_idx), per_rank, rank=rank, world_size=world)
        else:
            keys = [self.dataset.image_keys[i] for i in self.train_idx] if self.stage.shared_prefix > 1 else None
            self.sampler = ResumableSampler(len(self.train_idx), seed=self.stage.seed, rank=rank, world_size=world,
                                            group_keys=keys, group_size=self.stage.shared_prefix)
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._loader(Subset(self.dataset, self.train_idx), self.sampler)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_idx:
            return []
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = ResumableSampler(len(self.val_idx), seed=self.stage.seed, rank=rank, world_size=world, shuffle=False)
        return self._loader(Subset(self.dataset, self.val_idx), sampler)

    def state_dict(self) -> dict[str, Any]:
        """The sampler position after the last trained batch (not the loader's prefetch).

        Lightning saves from on_train_batch_end, before it counts the batch as completed,
        so `processed` is the number of batches done in this epoch in every case. The epoch
        is the sampler's own: after the last step of a run Lightning's epoch already moved on.
        """
        if self.sampler is None or self.trainer is None:
            return {}
        done_batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        state = self.sampler.state_dict()
        state["consumed"] = min(done_batches * self.stage.micro_batch, len(self.sampler))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._pending_state = dict(state)
