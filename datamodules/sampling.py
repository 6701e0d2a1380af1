"""Samplers and loaders that shard across ranks themselves and resume mid-epoch exactly.

The CLI runs the Trainer with `use_distributed_sampler=False`: every DataModule here builds its
loaders with `resumable_loader`, which shards by rank and, through `state_dict`, lets Lightning save
how far into the epoch a run got, so `--ckpt_path last` continues with the very next batch.
"""

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ShardedSampler(Sampler[int]):
    """This rank's indices of an epoch: a permutation seeded by (seed, epoch), or in order.

    Every rank gets the same number of indices (the tail that does not divide evenly is dropped when
    training; when evaluating, the last indices are repeated so no sample is left out). `skip` drops the
    first indices of the next pass: that is how a resumed run starts mid-epoch.
    """

    def __init__(
        self, size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True
    ):
        if size == 0:
            raise ValueError("the dataset is empty: check the data path and the split settings")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.world_size
        return -(-self.size // self.world_size)

    def permutation(self) -> torch.Tensor:
        """The epoch's shuffle of all indices, the same on every rank: seeded by (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator)

    def indices(self) -> list[int]:
        """This rank's full epoch, before any skipping."""
        if self.shuffle:
            order = self.permutation().tolist()
        else:
            order = list(range(self.size))
        per_rank = len(self)
        total = per_rank * self.world_size
        order = order[:total] if total <= len(order) else order + order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.indices()[skip:])


class RepeatedAugmentationSampler(ShardedSampler):
    """Repeated augmentation (Hoffer et al. 2020, DeiT's RASampler, timm's RepeatAugSampler) for training.

    The epoch's permutation is repeated element-wise (a, a, a, b, b, b, ...) and dealt to the ranks in
    turn, so the copies of an image land on consecutive ranks in the same step, each augmented on its
    own. As in DeiT, an epoch keeps the length of a plain one (size // world_size per rank): it shows
    size / repeats distinct images, each `repeats` times. (DeiT also rounds the epoch down to a multiple
    of 256 images; here it is only made even across ranks.) Resuming, `skip` works as in ShardedSampler.
    """

    def __init__(self, size: int, *, repeats: int = 3, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(size, shuffle=True, seed=seed, rank=rank, world_size=world_size, drop_last=True)
        if repeats < 1:
            raise ValueError(f"repeated augmentation needs repeats >= 1, got {repeats}")
        self.repeats = repeats

    def indices(self) -> list[int]:
        order = self.permutation().repeat_interleave(self.repeats).tolist()
        return order[self.rank : len(self) * self.world_size : self.world_size]


class ResumableLoader(DataLoader):
    """A DataLoader over a `ShardedSampler` that remembers how far into the epoch the run got.

    Lightning saves `state_dict()` of loaders that have one and restores it before the next epoch
    starts; the count is taken in the main process, so prefetching workers do not inflate it. It is kept
    as samples seen by all ranks together, so a run resumed on another number of devices continues the
    same global stream. The signature is DataLoader's own, so Lightning can rebuild the loader (it does
    for `predict`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.served = 0
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self):
        self.served = 0
        if self._resume_at is not None:
            epoch, samples_seen = self._resume_at
            self._resume_at = None
            if epoch == self.sampler.epoch:
                # The ranks deal the epoch's order in turn, so skipping samples_seen / world_size of this
                # rank's indices skips exactly the first samples_seen of the whole order.
                self.sampler.skip = samples_seen // self.sampler.world_size
                self.served = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        samples_seen = self.served * self.batch_size * self.sampler.world_size
        return {"epoch": getattr(self.sampler, "epoch", 0), "samples_seen": samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = (state["epoch"], state["samples_seen"])


def resumable_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    trainer=None,
    train: bool = True,
    repeats: int = 1,
    num_workers: int = 0,
    **kwargs,
) -> ResumableLoader:
    """The loader every DataModule returns: sharded over the trainer's ranks, resumable.

    `repeats` > 1 draws each training image that many times in a row, shuffled: repeated augmentation.
    Evaluation loaders (train=False) ignore it. Workers persist across epochs; batches are pinned for
    the copy to a GPU.
    """
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if repeats > 1 and train:
        if not shuffle:
            raise ValueError("repeated augmentation (repeats > 1) shuffles the epoch: it needs shuffle=True")
        sampler = RepeatedAugmentationSampler(
            len(dataset), repeats=repeats, seed=seed, rank=rank, world_size=world_size
        )
    else:
        sampler = ShardedSampler(
            len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=train
        )
    # A generator of its own: creating the loader's iterator then draws nothing from the global RNG, which
    # the model's dropout uses, so evaluation between training steps does not shift the training stream.
    generator = torch.Generator().manual_seed(seed)
    return ResumableLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        drop_last=train,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )


class ShardedDataModule(L.LightningDataModule):
    """Base of the DataModules here: every split's loader is `_loader(split, train)`, which subclasses
    build with `resumable_loader`; prediction reads `predict_split`."""

    predict_split = "test"

    def _loader(self, split: str, train: bool) -> ResumableLoader:
        raise NotImplementedError

    def train_dataloader(self) -> ResumableLoader:
        """The training loader, or an error when the split is smaller than one batch per device: the incomplete
        batch is dropped, which leaves none, and Lightning would end the fit at once saying only "No training
        batches"."""
        loader = self._loader("train", train=True)
        if len(loader) == 0:
            per_device = len(loader.sampler)
            raise ValueError(
                f"the training split has {len(loader.dataset)} examples, {per_device} per device, and "
                f"data.batch_size is {loader.batch_size}: the incomplete last batch is dropped, which leaves no "
                f"batch to train on; lower data.batch_size to at most {per_device}, or check the training data"
            )
        return loader

    def val_dataloader(self) -> ResumableLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> ResumableLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> ResumableLoader:
        return self._loader(self.predict_split, train=False)
