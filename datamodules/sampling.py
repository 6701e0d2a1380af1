"""Samplers and loaders that shard across ranks themselves and resume mid-epoch exactly.

The CLI runs the Trainer with `use_distributed_sampler=False`: every DataModule here builds its
loaders with `resumable_loader`, which shards by rank and, through `state_dict`, lets Lightning save
how far into the epoch a run got, so `--ckpt_path last` continues with the very next batch.
"""

from collections.abc import Iterator

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

    def indices(self) -> list[int]:
        """This rank's full epoch, before any skipping."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        per_rank = len(self)
        total = per_rank * self.world_size
        order = order[:total] if total <= len(order) else order + order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.indices()[skip:])


class ResumableLoader(DataLoader):
    """A DataLoader over a `ShardedSampler` that remembers how many batches of the epoch it served.

    Lightning saves `state_dict()` of loaders that have one and restores it before the next epoch
    starts; the count is taken in the main process, so prefetching workers do not inflate it. The
    signature is DataLoader's own, so Lightning can rebuild the loader (it does for `predict`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.served = 0
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self):
        self.served = 0
        if self._resume_at is not None:
            epoch, served = self._resume_at
            self._resume_at = None
            if epoch == self.sampler.epoch:
                self.sampler.skip = served * self.batch_size
                self.served = served
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches_served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = (state["epoch"], state["batches_served"])


def resumable_loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, trainer=None, train: bool = True, **kwargs
) -> ResumableLoader:
    """The loader every DataModule returns: sharded over the trainer's ranks, resumable."""
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    sampler = ShardedSampler(
        len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=train
    )
    # A generator of its own: creating the loader's iterator then draws nothing from the global RNG, which
    # the model's dropout uses, so evaluation between training steps does not shift the training stream.
    generator = torch.Generator().manual_seed(seed)
    return ResumableLoader(
        dataset, sampler=sampler, batch_size=batch_size, drop_last=train, generator=generator, **kwargs
    )
