"""Schedules as pure functions of the step, so resuming needs nothing but the step counter."""

from __future__ import annotations

import math

from saelab.training.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): warm-up, then the configured decay."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    decay_steps = cfg.lr_decay_steps or max(1, cfg.total_steps - cfg.lr_warmup_steps)
    decay_start = cfg.total_steps - decay_steps
    progress = min(1.0, max(0.0, (step - decay_start) / decay_steps))
    end = cfg.lr_end_factor
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - end) * progress
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear ramp from 1/warmup_steps to 1 over the first `warmup_steps` steps."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
