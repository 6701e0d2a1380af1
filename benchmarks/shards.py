"""Which training samples each rank drew, recorded inside a real distributed run, and the check on them.

Add the callback to a fit (`--trainer.callbacks+=benchmarks.shards.RecordShards
--trainer.callbacks.path shards.json`); rank 0 writes every rank's draws and the verdict of
`check_shards`: across all ranks, each image of an epoch is drawn exactly `repeats` times (repeated
augmentation's copies, 1 without it), so no rank repeats another's draw; only the epoch's last image
may be cut short. Used by tests/model/test_vision.py (CPU, gloo) and benchmarks/scaling.sh (GPUs).
"""

import json
from collections import Counter
from pathlib import Path

import lightning as L
import torch.distributed as dist


def check_shards(draws_per_rank: list[list[dict]], repeats: int) -> dict:
    """draws_per_rank[r] = [{"epoch": e, "indices": [...]}, ...] of rank r, one entry per step."""
    by_epoch: dict[int, Counter] = {}
    for draws in draws_per_rank:
        for draw in draws:
            by_epoch.setdefault(draw["epoch"], Counter()).update(draw["indices"])
    problems = []
    for epoch, counts in sorted(by_epoch.items()):
        wrong = {image: n for image, n in counts.items() if n != repeats}
        # The steps may end inside the last image's run of copies; every other image has all of them.
        if len(wrong) > 1 or any(n > repeats for n in wrong.values()):
            problems.append({"epoch": epoch, "images_drawn_wrong_number_of_times": wrong})
    sizes = {len(draws) for draws in draws_per_rank}
    return {
        "ranks": len(draws_per_rank),
        "steps_per_rank": sorted(sizes),
        "images_drawn": sum(len(counts) for counts in by_epoch.values()),
        "disjoint": not problems and len(sizes) == 1,
        "problems": problems,
    }


class RecordShards(L.Callback):
    """Records the dataset indices of every training batch on every rank; rank 0 writes them at the end."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.draws: list[dict] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loader = trainer.train_dataloader
        end = loader.served * loader.batch_size  # the sampler's order and the count served give the batch
        indices = loader.sampler.indices()[end - loader.batch_size : end]
        self.draws.append({"epoch": loader.sampler.epoch, "indices": indices})

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.draws)
        else:
            gathered = [self.draws]
        if trainer.is_global_zero:
            repeats = getattr(trainer.train_dataloader.sampler, "repeats", 1)
            report = {"repeats": repeats, **check_shards(gathered, repeats), "draws": gathered}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(report) + "\n")
