"""`hgrn2 predict` writes what the model predicts: each task's `predict_step` output (per-token loss for a language
model, class probabilities for images, classes for LRA) for every example, in the order the loader gave them."""

from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from hgrn2_lightning.checkpoint import AtomicCheckpointIO


class PredictionWriter(BasePredictionWriter):
    """Writes `predictions.pt` beside the run's logs when predict ends: {"predictions": rows of every batch
    concatenated, "split": the DataModule's predict split}. Under several processes each writes its own shard,
    `predictions-rank<R>.pt`."""

    def __init__(self):
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        name = "predictions.pt" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.pt"
        path = Path(trainer.log_dir or trainer.default_root_dir) / name
        split = getattr(trainer.datamodule, "predict_split", None)
        AtomicCheckpointIO().save_checkpoint({"predictions": torch.cat(batches).cpu(), "split": split}, path)
        print(f"\n{sum(len(batch) for batch in batches)} predictions ({split or 'predict'} split) written to {path}")
