"""Optimizer and learning-rate schedule settings (the optimizer itself is built by DeepSpeed from these)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate of the language model; vision/merger groups scale it (model trainable.*_lr_scale)."""
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak for cosine/linear decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping; 0 disables."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a fraction in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: expected >= 0 (0 disables), got {self.grad_clip}")
        self.betas = tuple(self.betas)  # YAML gives a list


def lr_multiplier(step: int, *, num_steps: int, cfg: OptimConfig) -> float:
    """Fraction of the peak lr at optimizer step ``step`` (0-based): linear warmup, then the decay schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay
