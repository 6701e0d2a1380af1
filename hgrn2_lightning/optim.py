"""AdamW with weight decay on matrices only, and the learning-rate schedules the paper's recipes use."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    """Optimiser and schedule; the YAML configs set these under `model.init_args.optim`."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_init_lr: float = 0.0
    """Learning rate at step 0 of the linear warmup (fairseq's inverse_sqrt starts at 1e-7)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps and optim.weight_decay must be >= 0")
        if not self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) must not exceed optim.lr ({self.lr})")


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The factor on config.lr at each step: linear warmup, then the schedule.

    A plain function, so LambdaLR leaves it out of checkpoints (it is rebuilt from the config on resume).
    """
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        c = config
        if step < c.warmup_steps:
            return (c.warmup_init_lr + (c.lr - c.warmup_init_lr) * step / c.warmup_steps) / c.lr
        if c.schedule == "constant":
            return 1.0
        if c.schedule == "inverse_sqrt":
            return math.sqrt(max(c.warmup_steps, 1) / max(step, 1))
        progress = min((step - c.warmup_steps) / max(total_steps - c.warmup_steps, 1), 1.0)
        return (c.min_lr + (c.lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / c.lr

    return factor


def configure_adamw(model: nn.Module, config: OptimConfig, total_steps: int, fused: bool = False) -> dict:
    """AdamW over two groups (weights of linear and embedding layers decay, nothing else) + the schedule.

    Returns the dict Lightning's `configure_optimizers` expects, with the scheduler stepped per step.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # tied weights appear twice
                continue
            seen.add(id(param))
            is_matrix = name == "weight" and isinstance(module, (nn.Linear, nn.Embedding))
            (decay if is_matrix else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_schedule(config, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

