"""Training speed as users judge it: items per second of whole steps, model FLOP utilisation, peak memory,
and the seconds from process start to the first optimizer step. Every `hgrn2 fit` has this callback (the
CLI adds it); at the end of training it writes `throughput.json` beside the TensorBoard logs, which is what
benchmarks/train.py reads.
"""

import json
import os
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import nn

# The first steps compile kernels and warm the allocator; the summary's medians skip them.
WARMUP_STEPS = 5


def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux), else the time this module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return _IMPORT_TIME


_IMPORT_TIME = time.time()


def matmul_training_flops(model: nn.Module) -> int:
    """6 FLOPs per weight of every Linear layer per item (2 forward, 4 backward); embedding lookups are free."""
    return 6 * sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))


class ThroughputMonitor(L.Callback):
    """Logs `train/<unit>_per_s` and `train/mfu` each step; summarises the run in `throughput.json`.

    The LightningModule names what it counts with `throughput_unit` ("tokens": every element of the input
    batch, else one per example) and may give `flops_per_item` (forward + backward) for the utilisation.
    """

    def __init__(self):
        self._last_step_end: float | None = None
        self._rates: list[float] = []
        self._losses: list[float] = []  # one per optimizer step: the mean of its micro-batches' losses
        self._micro_batch_losses: list[float] = []
        self._stepped_at: int | None = None
        self._first_step_end: float | None = None
        self._peak_flops: float | None = None
        self._flops_per_item: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Counted before the strategy wraps the model: FSDP's sharded weights would count only this rank's part.
        self._flops_per_item = getattr(pl_module, "flops_per_item", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stepped_at = trainer.global_step  # not 0 when resuming
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            precision = str(trainer.precision)
            dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
            self._peak_flops = get_available_flops(device, dtype)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Between two step ends lies one whole step (data, forward, backward, optimizer), synchronised by the
        # module's finite-loss check; a host timer around the forward alone would time only kernel launches.
        now = time.perf_counter()
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:  # Lightning hands over the loss divided by the accumulation factor
            self._micro_batch_losses.append(float(loss) * trainer.accumulate_grad_batches)
        if trainer.global_step != self._stepped_at:  # the optimizer stepped: these micro-batches were one step
            if self._micro_batch_losses:
                self._losses.append(statistics.fmean(self._micro_batch_losses))
            self._micro_batch_losses, self._stepped_at = [], trainer.global_step
        if self._first_step_end is None:
            self._first_step_end = time.time()
        if self._last_step_end is not None:
            rate = self._items(pl_module, batch) * trainer.world_size / (now - self._last_step_end)
            self._rates.append(rate)
            unit = getattr(pl_module, "throughput_unit", "samples")
            pl_module.log(f"train/{unit}_per_s", rate)
            mfu = self._mfu(rate / trainer.world_size)
            if mfu is not None:
                pl_module.log("train/mfu", mfu)
        self._last_step_end = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step_end = None  # the validation loop is not a training step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._rates:
            return
        steady = self._rates[WARMUP_STEPS:] or self._rates
        rate = statistics.median(steady)
        device = trainer.strategy.root_device
        peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        peaks = trainer.strategy.all_gather(torch.tensor(float(peak_bytes or 0), device=device))
        losses = torch.tensor(self._losses, device=device)
        if trainer.world_size > 1:  # each rank saw its share of the global batch: their mean is the batch's
            losses = trainer.strategy.all_gather(losses).mean(0)
        summary = {
            "unit": getattr(pl_module, "throughput_unit", "samples"),
            "per_s": rate,
            "per_s_per_device": rate / trainer.world_size,
            "mfu": self._mfu(rate / trainer.world_size),
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "steps_timed": len(steady),
            "peak_gib_per_device": [round(float(p) / 2**30, 3) for p in peaks.reshape(-1)] if peak_bytes else None,
            "first_step_s": self._first_step_end - process_start_time(),
            "losses": losses.tolist(),
        }
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank must ask
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "throughput.json").write_text(json.dumps(summary, indent=2) + "\n")

    @staticmethod
    def _items(pl_module: L.LightningModule, batch) -> int:
        inputs = batch[0]
        return inputs.numel() if getattr(pl_module, "throughput_unit", None) == "tokens" else len(inputs)

    def _mfu(self, rate_per_device: float) -> float | None:
        if not (self._flops_per_item and self._peak_flops):
            return None
        return rate_per_device * self._flops_per_item / self._peak_flops
