"""Image classification: the HGRN2 patch classifier and its LightningModule (DeiT's training recipe).

Following the HGRN ViT of the paper's framework (OpenNLPLab/im): images are cut into patches, each
flattened and embedded by a linear layer (no class token, no positional embedding: the scans order
the patches), the backbone runs non-causally over the patch sequence ("bidirectional") or over the
patch grid ("2d"), and the head is mean pooling, a norm and a linear classifier.
"""

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from timm.data import Mixup
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from hgrn2_lightning.model import HGRN2, HGRN2Config, RMSNorm, init_weights
from hgrn2_lightning.optim import OptimConfig, configure_adamw
from hgrn2_lightning.task import TaskModule
from hgrn2_lightning.throughput import matmul_training_flops


class PatchClassifier(nn.Module):
    """images [B, C, S, S] -> logits [B, num_classes], S = image_size, in (S / patch_size)^2 patches."""

    def __init__(
        self, config: HGRN2Config, num_classes: int, image_size: int, patch_size: int, in_channels: int = 3
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}: the patches must tile "
                f"the image; change model.init_args.image_size (and data.image_size) or patch_size"
            )
        if config.direction == "causal":
            raise ValueError(
                'an image classifier needs a non-causal backbone: set backbone.direction to "bidirectional" '
                '(forward and reverse scans over the patch sequence) or "2d" (scans along rows and columns)'
            )
        side = image_size // patch_size
        if config.direction == "2d" and tuple(config.grid) != (side, side):
            raise ValueError(
                f"backbone.grid {config.grid} does not match the {side} x {side} patch grid of {image_size} px "
                f"images in {patch_size} px patches: set backbone.grid [{side}, {side}]"
            )
        self.config, self.image_size, self.patch_size, self.in_channels = config, image_size, patch_size, in_channels
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, config.d_model)
        self.backbone = HGRN2(config)
        self.head_norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, num_classes)
        self.apply(lambda module: init_weights(module, config.init_std))

    def patchify(self, images: Tensor) -> Tensor:
        """[B, C, S, S] -> [B, (S/p)^2, p*p*C]: row-major patches, each flattened as (row, column, channel)."""
        B, C, H, W = images.shape
        expected = (self.in_channels, self.image_size, self.image_size)
        if (C, H, W) != expected:
            raise ValueError(
                f"images of shape {tuple(images.shape[1:])} (C, H, W), but the model takes {expected}: "
                f"make data.image_size and model.init_args.image_size agree"
            )
        p = self.patch_size
        patches = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return patches.reshape(B, (H // p) * (W // p), p * p * C)

    def features(self, images: Tensor) -> Tensor:
        """Per-patch features [B, patches, d] after the backbone's final norm."""
        return self.backbone(self.patch_embed(self.patchify(images)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.head_norm(self.features(images).mean(dim=1)))


@dataclass
class MixupConfig:
    """Mixup and CutMix of training batches (timm's Mixup); DeiT: mixup 0.8, cutmix 1.0, switch 0.5.

    Either alpha at 0 turns that one off; both at 0 (or prob 0) turn mixing off.
    """

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    """Chance that a batch is mixed at all."""
    switch_prob: float = 0.5
    """Chance of CutMix rather than Mixup when both are on."""
    mode: Literal["batch", "pair", "elem"] = "batch"
    """One mixing factor per batch, per pair of samples, or per sample."""

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup alphas must be >= 0, got {self.mixup_alpha} and {self.cutmix_alpha}")
        if not 0 <= self.prob <= 1 or not 0 <= self.switch_prob <= 1:
            raise ValueError(f"mixup.prob and mixup.switch_prob must be in [0, 1], got {self.prob}, {self.switch_prob}")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross entropy against probability targets [B, classes] (what Mixup and label smoothing make)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


class ImageClassifier(TaskModule):
    """Trains `PatchClassifier`: Mixup/CutMix soft targets or label smoothing, top-1/top-5 accuracy.

    EMA of the weights: add Lightning's `EMAWeightAveraging` callback to `trainer.callbacks` (it evaluates
    and saves the averaged weights); the paper's runs used none.
    """

    throughput_unit = "images"

    def __init__(
        self,
        backbone: HGRN2Config = HGRN2Config(direction="bidirectional"),
        num_classes: int | None = None,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        mixup: MixupConfig = MixupConfig(),
        label_smoothing: float = 0.1,
        optim: OptimConfig = OptimConfig(),
        warmup_epochs: float = 0.0,
        lr_reference_batch: int | None = None,
        compile_blocks: bool = False,
    ):
        """
        Args:
            backbone: sizes and options of the HGRN2 layers; direction "bidirectional" or "2d".
            num_classes: comes from the DataModule (linked by the CLI).
            image_size: side of the (square) input images in pixels; must match data.image_size.
            patch_size: side of the square patches; image_size must be a multiple of it.
            in_channels: colour channels of the images.
            mixup: Mixup/CutMix of training batches.
            label_smoothing: smoothing of the targets (folded into the Mixup targets when mixing is on).
            optim: AdamW and learning-rate schedule (stepped per optimizer step).
            warmup_epochs: linear warmup length in epochs (DeiT counts warmup in epochs); it replaces
                optim.warmup_steps, converted with the number of optimizer steps in an epoch.
            lr_reference_batch: if set, optim.lr is the rate for a global batch of this size and the rate
                used is optim.lr * global batch / lr_reference_batch (DeiT's linear scaling with 512), the
                global batch being data.batch_size x devices x nodes x accumulate_grad_batches.
            compile_blocks: compile each block with torch.compile (norms, gates, activations and residual adds
                fused around the scans, which stay custom ops: no graph break); all blocks share one graph,
                whatever their drop-path rates. The first step waits for the compilation. Not stored in the
                checkpoint's hyperparameters.
        """
        super().__init__()
        if not num_classes or num_classes < 2:
            raise ValueError(
                f"model.num_classes is {num_classes}: the CLI links it from data.num_classes, so use an image "
                f"DataModule, or set model.init_args.num_classes (at least 2)"
            )
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if warmup_epochs < 0 or (lr_reference_batch is not None and lr_reference_batch < 1):
            raise ValueError("warmup_epochs must be >= 0 and lr_reference_batch positive (or None)")
        if warmup_epochs and optim.warmup_steps:
            raise ValueError(
                f"both warmup_epochs ({warmup_epochs}) and optim.warmup_steps ({optim.warmup_steps}) are set: keep one"
            )
        self.save_hyperparameters(ignore=["compile_blocks"])
        self.optim, self.num_classes, self.label_smoothing = optim, num_classes, label_smoothing
        self.warmup_epochs, self.lr_reference_batch = warmup_epochs, lr_reference_batch
        self.model = PatchClassifier(backbone, num_classes, image_size, patch_size, in_channels)
        if compile_blocks:
            self.model.backbone.compile_blocks()
        self.mixup = (
            Mixup(
                mixup_alpha=mixup.mixup_alpha,
                cutmix_alpha=mixup.cutmix_alpha,
                prob=mixup.prob,
                switch_prob=mixup.switch_prob,
                mode=mixup.mode,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if mixup.enabled
            else None
        )
        self.top_k = (1, 5) if num_classes > 5 else (1,)
        self.accuracy = nn.ModuleDict(
            {
                f"{split}_acc{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for split in ("val", "test")
                for k in self.top_k
            }
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    @property
    def flops_per_item(self) -> int:
        """Training FLOPs per image, for the model FLOP utilisation."""
        tokens = (self.model.image_size // self.model.patch_size) ** 2
        return (matmul_training_flops(self.model) + self.model.backbone.scan_flops_per_token()) * tokens

    def setup(self, stage: str) -> None:
        """The data must fit the head and the patch grid; say so before the first step, not as a shape error."""
        datamodule = self.trainer.datamodule
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and classes != self.num_classes:
            raise ValueError(
                f"the data has {classes} classes but the classifier head has {self.num_classes}: "
                f"let the CLI link data.num_classes, or set model.init_args.num_classes {classes}"
            )
        size = getattr(datamodule, "image_size", None)
        if size is not None and size != self.model.image_size:
            raise ValueError(
                f"data.image_size is {size} but the model takes {self.model.image_size} px images: make them agree"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another class count stops with both counts (the head is sized by the data's classes),
        not as a state_dict size mismatch from inside torch."""
        trained = checkpoint.get("hyper_parameters", {}).get("num_classes")
        if trained is not None and trained != self.num_classes:
            raise ValueError(
                f"the checkpoint's classifier has {trained} classes but the data has {self.num_classes}: evaluate or "
                f"resume on the dataset it was trained on (the same class folders in train/ and val/)"
            )
        super().on_load_checkpoint(checkpoint)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        if self.mixup is not None:
            if len(images) % 2:
                raise ValueError(
                    f"Mixup/CutMix mixes each image with the batch reversed and needs an even batch size, "
                    f"got {len(images)}: set data.batch_size to an even number"
                )
            images, targets = self.mixup(images, labels)
            loss = soft_target_cross_entropy(self.model(images), targets)
        else:
            loss = F.cross_entropy(self.model(images).float(), labels, label_smoothing=self.label_smoothing)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, split: str, batch: tuple[Tensor, Tensor]) -> None:
        images, labels = batch
        logits = self.model(images)
        self.log(f"{split}/loss", F.cross_entropy(logits.float(), labels), prog_bar=True, sync_dist=True)
        for k in self.top_k:
            metric = self.accuracy[f"{split}_acc{k}"]
            metric(logits, labels)
            self.log(f"{split}/acc{k}", metric, prog_bar=k == 1)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities [B, num_classes]."""
        return self.model(batch[0]).float().softmax(dim=-1)

    def on_fit_end(self) -> None:
        metrics = self.trainer.callback_metrics
        if "val/acc1" in metrics and self.trainer.is_global_zero:
            print(f"\nvalidation top-1 accuracy: {metrics['val/acc1']:.2%} (chance: {1 / self.num_classes:.0%})")

    def configure_optimizers(self):
        trainer = self.trainer
        if trainer.train_dataloader is None:  # the epoch length and batch size are read below
            trainer.fit_loop.setup_data()
        total_steps, accumulate = trainer.estimated_stepping_batches, trainer.accumulate_grad_batches
        optim = self.optim
        if self.warmup_epochs:
            if trainer.num_training_batches == float("inf"):
                raise ValueError("warmup_epochs needs a train loader of known length: set optim.warmup_steps instead")
            steps_per_epoch = math.ceil(trainer.num_training_batches / accumulate)
            optim = replace(optim, warmup_steps=round(self.warmup_epochs * steps_per_epoch))
        if self.lr_reference_batch:
            global_batch = trainer.train_dataloader.batch_size * trainer.world_size * accumulate
            scaled = optim.lr * global_batch / self.lr_reference_batch
            if scaled < optim.min_lr:
                raise ValueError(
                    f"the learning rate scaled to the global batch, {optim.lr:.3g} x {global_batch} / "
                    f"{self.lr_reference_batch} = {scaled:.3g}, is below optim.min_lr ({optim.min_lr:.3g}): lower "
                    f"optim.min_lr, raise the batch, or set lr_reference_batch null to take optim.lr as it is"
                )
            optim = replace(optim, lr=scaled)
            rank_zero_info(f"learning rate {optim.lr:.3g}: {self.optim.lr:.3g} x global batch {global_batch} / "
                           f"{self.lr_reference_batch}")
        return configure_adamw(self, optim, total_steps, self.fused_optimizer)
