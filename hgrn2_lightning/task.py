"""What the language, image and LRA LightningModules share: exact resume, a finite loss, clipping anywhere."""

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from hgrn2_lightning.checkpoint import load_rng_states, save_rng_states


class TaskModule(L.LightningModule):
    """Base of the task modules: checkpoints carry the RNG streams (a resumed run draws the same dropout
    and augmentation as an uninterrupted one), a non-finite training loss stops the run with advice, and
    `trainer.gradient_clip_val` works with every strategy."""

    def check_finite(self, loss: Tensor) -> None:
        if not loss.isfinite():
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {self.global_step}: lower model.optim.lr, set "
                f"trainer.gradient_clip_val (the configs here use 1.0 to 5.0), or train in bf16-mixed or fp32 "
                f"rather than fp16; resume from the last good checkpoint with --ckpt_path"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_rng_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load_rng_states(checkpoint)

    @property
    def fused_optimizer(self) -> bool:
        """Whether the optimizer may be one fused kernel (fewer passes over the weights and their moments than
        foreach). Not under fp16's loss scaling, which a fused step undoes internally, after the clipping would
        have seen scaled gradients, nor under FSDP, whose sharded weights keep foreach."""
        return self.trainer.precision != "16-mixed" and not isinstance(self.trainer.strategy, FSDPStrategy)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        by_norm = bool(gradient_clip_val) and gradient_clip_algorithm in (None, "norm")
        if by_norm and isinstance(self.trainer.strategy, FSDPStrategy):
            # FSDP's precision plugin cannot clip by norm; the wrapped model computes the norm over all shards.
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        elif gradient_clip_val and optimizer.defaults.get("fused"):
            # Lightning's mixed-precision plugin refuses a fused optimizer (it expects one to unscale fp16
            # gradients itself); without a scaler the gradients are the true ones, clipped here as it would.
            clip = torch.nn.utils.clip_grad_norm_ if by_norm else torch.nn.utils.clip_grad_value_
            clip(self.parameters(), gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
