"""Checkpoints: written atomically (a crash mid-write leaves the previous file intact), resumed exactly."""

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the target's folder, syncs it to disk, then renames it over the target.

    A rename within one filesystem is atomic, so readers see the old checkpoint or the new one. (Lightning's
    own writer stages the file in the system temp folder and moves it, which copies across filesystems.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staging, target)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise


def save_rng_states(checkpoint: dict[str, Any]) -> None:
    """Store the random generators in a checkpoint, so a resumed run draws the same dropout masks.

    The data loaders draw from generators of their own, so between a checkpoint and the next training
    step only the model touches these: restoring them at load time continues the very same stream.
    """
    checkpoint["rng_states"] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state_as_tensors(),
        "python": random.getstate(),
    }


def load_rng_states(checkpoint: dict[str, Any]) -> None:
    states = checkpoint.get("rng_states")
    if not states:
        return
    torch.set_rng_state(states["torch"])
    if states["cuda"] and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    random.setstate(states["python"])


def _numpy_state_as_tensors() -> dict:
    """NumPy's generator state as a tensor and numbers: checkpoints then load with weights_only=True."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
