"""The causal language model: token embedding, the HGRN2 backbone, an output head; and its LightningModule."""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hgrn2_lightning.model import HGRN2, HGRN2Config, init_weights
from hgrn2_lightning.optim import OptimConfig, configure_adamw
from hgrn2_lightning.task import TaskModule
from hgrn2_lightning.throughput import matmul_training_flops
from kernels.cross_entropy import linear_cross_entropy


class CausalLM(nn.Module):
    """tokens [B, T] -> next-token logits [B, T, vocab]. No positional encoding: the recurrence orders."""

    def __init__(self, config: HGRN2Config, vocab_size: int, tie_embeddings: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.backbone = HGRN2(config)
        self.head = nn.Linear(config.d_model, vocab_size, bias=False)
        self.apply(lambda module: init_weights(module, config.init_std))
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor, states: list[Tensor] | None = None) -> Tensor:
        """Given `states` (from `new_states`), they carry the context in and are advanced in place."""
        return self.head(self.features(tokens, states))

    def features(
        self, tokens: Tensor, states: list[Tensor] | None = None, cu_seqlens: Tensor | None = None
    ) -> Tensor:
        """What the head reads: [B, T, d_model]. Given `cu_seqlens`, tokens [1, T] are sequences packed end to end."""
        return self.backbone(self.embed(tokens), states, cu_seqlens=cu_seqlens)

    def new_states(self, batch_size: int, device: torch.device | str | None = None) -> list[Tensor]:
        return self.backbone.new_states(batch_size, device)


class LanguageModel(TaskModule):
    """Trains `CausalLM` on next-token prediction; logs loss, bits per token and byte, lr (tokens/s and
    MFU come from the CLI's ThroughputMonitor)."""

    throughput_unit = "tokens"

    def __init__(
        self,
        backbone: HGRN2Config = HGRN2Config(),
        vocab_size: int | None = None,
        tie_embeddings: bool = False,
        optim: OptimConfig = OptimConfig(),
        tokenizer: str = "bytes",
        chunked_loss: bool = False,
        compile_blocks: bool = False,
        activation_checkpointing: bool = False,
        recompute_scan_states: bool = False,
        scan_backend: Literal["auto", "chunked"] = "auto",
    ):
        """
        Args:
            backbone: sizes and options of the HGRN2 layers.
            vocab_size: comes from the DataModule's tokenizer (linked by the CLI).
            tie_embeddings: share the input embedding with the output head.
            optim: AdamW and learning-rate schedule.
            tokenizer: the tokenizer the data used (linked by the CLI); stored so `hgrn2 generate` can decode.
            chunked_loss: compute the head and the loss a chunk of tokens at a time (kernels/cross_entropy.py),
                never holding the [tokens, vocab] logits: the same loss and gradients in less memory.
            compile_blocks: compile each block with torch.compile, fusing its norms, activations and residual
                adds (the scan is one custom op inside it: no graph break). Blocks that differ only in their
                weights share a compiled graph (layer 0, without a lower bound, has its own); drop_path gives
                every block its own rate and so its own graph, and torch.compile leaves blocks past 8 graphs
                uncompiled. The first step waits for the compilation. Not stored in the checkpoint's
                hyperparameters.
            activation_checkpointing: keep only each block's input during the forward and recompute the rest
                in the backward: about a third more compute for much less activation memory (large models,
                long sequences). With norm "batchnorm" the recomputation updates the running statistics a
                second time. Not stored in the checkpoint's hyperparameters.
            recompute_scan_states: the scans keep no chunk states for the backward (K * V / 32 values per token
                and head, 6.1 GiB at the 370M config's 32k tokens) and rebuild them there with one more
                sequential pass over the gate and input. Not stored in the checkpoint's hyperparameters.
            scan_backend: "auto" runs the Triton scan on CUDA; "chunked" the pure-PyTorch chunked form everywhere,
                the plain path that the kernels' training curves are checked against (benchmarks/train.py
                compares the per-step losses of its runs). Not stored in the checkpoint's hyperparameters.
        """
        super().__init__()
        if not vocab_size:
            raise ValueError(
                "model.vocab_size is not set: the CLI links it from data.vocab_size, so use a DataModule "
                "that has a tokenizer, or set model.init_args.vocab_size"
            )
        # How to run, not what the model is: a checkpoint loaded for generation or evaluation should not compile
        # or recompute because its training did.
        self.save_hyperparameters(
            ignore=["compile_blocks", "activation_checkpointing", "recompute_scan_states", "scan_backend"])
        self.optim = optim
        self.model = CausalLM(backbone, vocab_size, tie_embeddings)
        self.model.backbone.checkpoint_blocks = activation_checkpointing
        for block in self.model.backbone.blocks:
            block.mixer.recompute_scan_states = recompute_scan_states
            block.mixer.scan_backend = scan_backend
        if compile_blocks:
            self.model.backbone.compile_blocks()

    def forward(self, tokens: Tensor, states: list[Tensor] | None = None) -> Tensor:
        return self.model(tokens, states)

    @property
    def flops_per_item(self) -> int:
        """Training FLOPs per token, for the model FLOP utilisation."""
        return matmul_training_flops(self.model) + self.model.backbone.scan_flops_per_token()

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        hidden = self.model.features(inputs).flatten(0, 1)
        if self.hparams.chunked_loss:
            return linear_cross_entropy(hidden, self.model.head.weight, targets.flatten())
        return F.cross_entropy(self.model.head(hidden).float(), targets.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bits_per_token", loss / math.log(2))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_eval("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_eval("test", batch)

    def _log_eval(self, split: str, batch: tuple[Tensor, Tensor]) -> None:
        loss = self._loss(batch)
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/bits_per_token", loss / math.log(2), sync_dist=True)
        bytes_per_token = getattr(self.trainer.datamodule, "bytes_per_token", None)
        if bytes_per_token:
            self.log(f"{split}/bits_per_byte", loss / math.log(2) / bytes_per_token, prog_bar=True, sync_dist=True)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Per-token loss (nats) of each sequence: what a scoring or perplexity job wants."""
        inputs, targets = batch
        logits = self.model(inputs)
        return F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")

    def on_fit_end(self) -> None:
        metrics = self.trainer.callback_metrics
        datamodule = self.trainer.datamodule
        if "val/bits_per_byte" in metrics and self.trainer.is_global_zero:
            entropy = getattr(datamodule, "unigram_entropy", lambda: None)()
            beside = f" (unigram entropy of the validation bytes: {entropy:.2f})" if entropy else ""
            print(f"\nvalidation bits per byte: {metrics['val/bits_per_byte']:.3f}{beside}")

    def configure_optimizers(self):
        return configure_adamw(self, self.optim, self.trainer.estimated_stepping_batches, self.fused_optimizer)
