"""Learning-rate schedules as factories ``(optimizer, total_steps) -> LRScheduler`` for Hydra ``_partial_`` configs."""

from __future__ import annotations

import math

import torch

from pruneflow.errors import ConfigError


def cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, final_lr_fraction: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_lr_fraction`` × lr at ``total_steps``."""
    if warmup_steps < 0 or not 0.0 <= final_lr_fraction <= 1.0:
        raise ConfigError(
            f"scheduler.warmup_steps must be >= 0 and final_lr_fraction in [0, 1], "
            f"got {warmup_steps} and {final_lr_fraction}"
        )
    total_steps = max(int(total_steps), 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
