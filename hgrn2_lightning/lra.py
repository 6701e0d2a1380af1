"""Long Range Arena models: a sequence classifier and the two-document retrieval model; their LightningModule.

As in the HGRN2 LRA runs (an S4-style framework): the input is embedded (tokens) or projected (pixel
values), optionally given sinusoidal positions, run through non-causal HGRN2 layers (a forward and a
reverse scan, or four scans over the image grid), mean-pooled over the real positions only, and
classified by a linear head. Retrieval encodes both documents with the one encoder and classifies
[u, v, u - v, u * v] with Linear(4d, d) -> GELU -> Linear(d, 2) (Nystromformer's head, as S4's).
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from hgrn2_lightning.model import HGRN2, HGRN2Config, init_weights
from hgrn2_lightning.optim import OptimConfig, configure_adamw
from hgrn2_lightning.task import TaskModule


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The Transformer's positional encoding [length, dim]: sin and cos of t / 10000^(2k / dim)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim, device=device)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return encoding


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean of x [B, T, d] over the first lengths[b] positions of each row, in float32: [B, d]."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return (x.float() * keep[..., None]).sum(1) / lengths[:, None].clamp_min(1)


class SequenceEncoder(nn.Module):
    """inputs -> one feature vector per sequence [B, d]: embed, add positions, HGRN2, mean over the real part."""

    def __init__(self, config: HGRN2Config, vocab_size: int | None, input_channels: int | None, positions: bool):
        super().__init__()
        if (vocab_size is None) == (input_channels is None):
            raise ValueError(
                "give the model either vocab_size (token inputs) or input_channels (pixel values), not both or "
                "neither: the CLI links them from the DataModule (data.vocab_size, data.input_channels)"
            )
        # S4's encoders at PyTorch's initialisation: an N(0, 1) embedding matches unit-amplitude positions,
        # where the backbone's 0.02 would drown the tokens under them.
        d = config.d_model
        self.embed = nn.Embedding(vocab_size, d) if vocab_size else nn.Linear(input_channels, d)
        self.tokens = vocab_size is not None
        self.positions = positions
        self.backbone = HGRN2(config)
        self.backbone.apply(lambda module: init_weights(module, config.init_std))

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        """inputs [B, T] token ids or [B, T, channels] values; lengths [B] -> [B, d]."""
        x = self.embed(inputs)
        if self.positions:
            x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device).to(x.dtype)
        # Token sequences are padded after their end: the mask keeps padding out of the reverse scans, and
        # pooling skips it, so an example's logits never depend on its padding. (In training, batch norm's
        # statistics still count padded positions, as in S4's framework; evaluation uses running statistics.)
        # Pixel sequences are whole.
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None] if self.tokens else None
        return masked_mean(self.backbone(x, mask=mask), lengths)


class RetrievalHead(nn.Module):
    """Two documents' features u, v [B, d] -> logits from [u, v, u - v, u * v]."""

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * d_model, d_model), nn.GELU(), nn.Linear(d_model, num_classes))

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        return self.mlp(pair_features(u, v))


def pair_features(u: Tensor, v: Tensor) -> Tensor:
    """[u, v, u - v, u * v]: each document, their difference and their agreement (the NLI features)."""
    return torch.cat([u, v, u - v, u * v], dim=-1)


class LRAModel(nn.Module):
    """inputs, lengths -> logits. Paired (retrieval): inputs [B, 2, T] and lengths [B, 2], one encoder for both."""

    def __init__(
        self,
        config: HGRN2Config,
        num_classes: int,
        vocab_size: int | None = None,
        input_channels: int | None = None,
        paired: bool = False,
        positions: bool = False,
    ):
        super().__init__()
        self.paired = paired
        self.encoder = SequenceEncoder(config, vocab_size, input_channels, positions)
        self.head = RetrievalHead(config.d_model, num_classes) if paired else nn.Linear(config.d_model, num_classes)
        self.head.apply(lambda module: init_weights(module, config.init_std))

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        if not self.paired:
            return self.head(self.encoder(inputs, lengths))
        if inputs.dim() < 3 or inputs.shape[1] != 2:
            raise ValueError(f"a retrieval model takes pairs of documents [B, 2, T], got {tuple(inputs.shape)}")
        features = self.encoder(inputs.flatten(0, 1), lengths.flatten()).view(inputs.shape[0], 2, -1)
        return self.head(features[:, 0], features[:, 1])


class SequenceClassifier(TaskModule):
    """Trains an LRA model with cross entropy; logs loss and accuracy, and prints the accuracy beside the
    majority-class rate at the end of fit (validation) and test."""

    def __init__(
        self,
        backbone: HGRN2Config = HGRN2Config(direction="bidirectional"),
        num_classes: int | None = None,
        vocab_size: int | None = None,
        input_channels: int | None = None,
        paired: bool = False,
        positional_encoding: Literal["none", "sinusoidal"] = "none",
        optim: OptimConfig = OptimConfig(),
        schedule_steps: int | None = None,
        compile_blocks: bool = False,
    ):
        """
        Args:
            backbone: sizes and options of the HGRN2 layers; direction "bidirectional" (1D tasks) or "2d"
                with the image's grid (image-like tasks).
            num_classes: linked from data.num_classes by the CLI.
            vocab_size: linked from data.vocab_size (token tasks).
            input_channels: linked from data.input_channels (pixel tasks).
            paired: linked from data.paired (retrieval: two documents per example).
            positional_encoding: "sinusoidal" adds the Transformer's positions to the embedded input.
            optim: AdamW and learning-rate schedule.
            schedule_steps: length of the schedule in optimizer steps (the LRA recipes give one longer than
                the run); None is the length of the run.
            compile_blocks: compile each block with torch.compile (`HGRN2.compile_blocks`): the norms, gates,
                activations and residual adds run fused around the scans. The first step waits for the
                compilation. Not stored in the checkpoint's hyperparameters.
        """
        super().__init__()
        if not num_classes:
            raise ValueError(
                "model.num_classes is not set: the CLI links it from data.num_classes, so use an LRA DataModule "
                "or set model.init_args.num_classes"
            )
        if schedule_steps is not None and schedule_steps < 1:
            raise ValueError(f"model.schedule_steps must be positive or null, got {schedule_steps}")
        self.save_hyperparameters(ignore=["compile_blocks"])
        self.backbone_config, self.optim, self.schedule_steps = backbone, optim, schedule_steps
        self.model = LRAModel(
            backbone, num_classes, vocab_size, input_channels, paired, positional_encoding == "sinusoidal"
        )
        if compile_blocks:
            self.model.encoder.backbone.compile_blocks()
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro") for _ in range(3)
        )

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        return self.model(inputs, lengths)

    def setup(self, stage: str) -> None:
        """The data's image grid must be the 2D scans' grid: say so before the first step."""
        if not hasattr(self.trainer.datamodule, "grid"):
            return
        grid, config = self.trainer.datamodule.grid, self.backbone_config
        if config.direction == "2d" and tuple(config.grid or ()) != tuple(grid or ()):
            raise ValueError(
                f"backbone.direction is 2d with grid {config.grid}, but the data's grid is {grid}: "
                f"set model.init_args.backbone.grid to {list(grid) if grid else 'the image size'}"
                + ("" if grid else ', or use direction "bidirectional" for sequences that are not images')
            )

    def _step(self, split: str, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        inputs, lengths, labels = batch
        logits = self.model(inputs, lengths).float()
        loss = F.cross_entropy(logits, labels)
        metric = getattr(self, f"{split}_acc")
        metric(logits, labels)
        training = split == "train"
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=not training)
        self.log(f"{split}/acc", metric, prog_bar=True, on_step=training, on_epoch=not training)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._step("train", batch)
        self.check_finite(loss)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._step("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._step("test", batch)

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        """The predicted class of each example."""
        inputs, lengths, _ = batch
        return self.model(inputs, lengths).argmax(-1)

    def on_fit_end(self) -> None:
        self._report("val")

    def on_test_end(self) -> None:
        self._report("test")

    def _report(self, split: str) -> None:
        """Prints the split's accuracy beside the majority-class rate: what a model that learnt nothing gets."""
        accuracy = self.trainer.callback_metrics.get(f"{split}/acc")
        baseline = getattr(self.trainer.datamodule, "majority_baseline", None)
        if accuracy is None or not self.trainer.is_global_zero:
            return
        beside = ""
        if baseline:
            label, rate = baseline(split)
            beside = f" (majority class {label}: {rate:.2%})"
        print(f"\n{split} accuracy: {accuracy:.2%}{beside}")

    def configure_optimizers(self):
        return configure_adamw(self, self.optim, self.schedule_steps or self.trainer.estimated_stepping_batches,
                               self.fused_optimizer)
