"""The stage's data: a train/validation split of the records, sharded resumable loaders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Subset

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe


class StageData(pl.LightningDataModule):
    """Loaders over data.jsonl for one stage; the sampler position is saved in checkpoints."""

    def __init__(self, recipe: "Recipe", stage: str, paths: dict[str, Path], image_processor: Callable,
                 tokens_per_image: int, rejects_path: Path | None = None) -> None:
        super().__init__()
        from vrwkv_core.data.dataset import VisionLanguageDataset
        from vrwkv_core.tokenizer import default_tokenizer
        from vrwkv_core.train.runner import split_indices

        self.recipe = recipe
        self.stage = getattr(recipe, stage)
        self.dataset = VisionLanguageDataset(
            paths["records"], paths["images"], default_tokenizer(), image_processor,
            tokens_per_image, recipe.data.ctx_len, skip_bad_images=recipe.data.skip_bad_images,
            image_position=self.stage.image_position or recipe.model.image_position, rejects_path=rejects_path,
        )  # fmt: skip
        self.train_idx, self.val_idx = split_indices(len(self.dataset), recipe.data.val_fraction, self.stage.seed)
        self.sampler: Any = None
        self._pending_state: dict | None = None

    def _loader(self, subset: Subset, sampler: Any, shuffle: bool = False) -> DataLoader:
        from vrwkv_core.data.dataset import collate

        workers = self.recipe.data.num_workers
        return DataLoader(
            subset, batch_size=self.stage.micro_batch, sampler=sampler, collate_fn=collate,
            num_workers=workers, persistent_workers=workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        from vrwkv_core.data.dataset import ResumableSampler

        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.sampler = ResumableSampler(len(self.train_idx), seed=self.stage.seed, rank=rank, world_size=world)
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._loader(Subset(self.dataset, self.train_idx), self.sampler)

    def val_dataloader(self) -> DataLoader | list:
        from vrwkv_core.data.dataset import ResumableSampler

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
