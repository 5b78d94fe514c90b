"""Learning-rate schedules as pure functions of the step, behind a small registry.

Each returns the multiplier of the peak lr for optimizer step `step` (0-based: the lr used by the
step about to run). Warm-up is shared: linear from 1/warmup to 1, so no step runs at lr 0.
"""

from __future__ import annotations

import math

from astrai_ds.config.train import ScheduleConfig


def _constant(progress: float, cfg: ScheduleConfig) -> float:
    return 1.0


def _cosine(progress: float, cfg: ScheduleConfig) -> float:
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(progress: float, cfg: ScheduleConfig) -> float:
    return 1.0 - (1 - cfg.min_lr_ratio) * progress


def _wsd(progress: float, cfg: ScheduleConfig) -> float:
    """Warmup-stable-decay: flat at the peak, then a linear decay over the last `decay_fraction`."""
    start = 1.0 - cfg.decay_fraction
    if progress <= start:
        return 1.0
    return 1.0 - (1 - cfg.min_lr_ratio) * (progress - start) / cfg.decay_fraction


SCHEDULES = {"constant": _constant, "cosine": _cosine, "linear": _linear, "wsd": _wsd}


def lr_multiplier(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """The factor applied to the peak lr at `step` (0-based), for a run of `total_steps` steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    # The floor holds past the end too (schedule.total_steps below max_steps), where rounding in a formula
    # could otherwise land a hair below it, or below 0.
    return max(cfg.min_lr_ratio, SCHEDULES[cfg.type](progress, cfg))
