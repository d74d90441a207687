"""Learning-rate schedules: pure functions of the step, so resuming needs nothing but the step number."""

from __future__ import annotations

import math

from trainers.config import OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    warmup: linear from lr/warmup to lr over `warmup_steps` (never 0, so step 0 still learns);
    cosine: half-cosine from lr down to lr*min_lr_ratio at the last step;
    wsd (warmup-stable-decay): flat lr, then linear to lr*min_lr_ratio over the last `decay_fraction` of steps;
    constant: flat lr after warmup.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    last = max(total_steps - 1, cfg.warmup_steps)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(last - cfg.warmup_steps, 1)
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    # wsd: the decay phase is the last decay_fraction of all steps (at least one step).
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))
    decay_start = max(total_steps - decay_steps, cfg.warmup_steps)
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(last - decay_start, 1)
    return cfg.lr + (floor - cfg.lr) * min(progress, 1.0)
