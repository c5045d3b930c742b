"""Learning-rate schedules: pure functions of the step, each a few lines, tested point by point.

``step`` is the number of completed updates (0 for the first update); ``lr`` is the peak
(``optim.lr``). Every schedule warms up linearly over ``warmup`` steps as nanoGPT does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from trainctl.hooks import PluginSpec, RunInfo, hookimpl


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    return lr * (step + 1) / (warmup + 1)


def cosine(step: int, *, lr: float, warmup: int, decay_steps: int, min_lr: float) -> float:
    """nanoGPT's ``get_lr``: warmup, cosine decay to ``min_lr`` at ``decay_steps``, then flat."""
    if step < warmup:
        return warmup_lr(step, lr, warmup)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / max(decay_steps - warmup, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def linear(step: int, *, lr: float, warmup: int, decay_steps: int, min_lr: float) -> float:
    """Warmup, then a straight line from ``lr`` to ``min_lr`` at ``decay_steps``."""
    if step < warmup:
        return warmup_lr(step, lr, warmup)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / max(decay_steps - warmup, 1)
    return lr + ratio * (min_lr - lr)


def constant(step: int, *, lr: float, warmup: int, decay_steps: int, min_lr: float) -> float:
    """Warmup, then ``lr`` for ever."""
    return warmup_lr(step, lr, warmup) if step < warmup else lr


def wsd(step: int, *, lr: float, warmup: int, decay_steps: int, min_lr: float, decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay: warmup, ``lr`` until the last ``decay_fraction`` of ``decay_steps``,
    then linear decay to ``min_lr``."""
    if step < warmup:
        return warmup_lr(step, lr, warmup)
    decay_start = decay_steps - int(decay_fraction * decay_steps)
    if step < decay_start:
        return lr
    if step > decay_steps:
        return min_lr
    ratio = (step - decay_start) / max(decay_steps - decay_start, 1)
    return lr + ratio * (min_lr - lr)


def inverse_sqrt(step: int, *, lr: float, warmup: int, decay_steps: int, min_lr: float) -> float:
    """Warmup, then ``lr * sqrt(warmup / (step + 1))`` (the original Transformer's decay)."""
    if step < warmup:
        return warmup_lr(step, lr, warmup)
    return max(lr * math.sqrt(max(warmup, 1) / (step + 1)), min_lr)


SCHEDULES = {"cosine": cosine, "linear": linear, "constant": constant, "wsd": wsd, "inverse_sqrt": inverse_sqrt}


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    schedule: Literal["cosine", "linear", "constant", "wsd", "inverse_sqrt"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 = train.max_steps
    min_lr: float = -1.0  # < 0: optim.lr / 10 (nanoGPT, after Chinchilla)
    decay_fraction: float = 0.2  # wsd only

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be 0 or more")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError("decay_fraction must be in (0, 1]")


class LRSchedule:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config = config
        self.decay_steps = config.decay_steps or run.max_steps
        extra = {"decay_fraction": config.decay_fraction} if config.schedule == "wsd" else {}
        self.fn = SCHEDULES[config.schedule]
        self.extra = extra

    @hookimpl
    def trainctl_check_config(self, config: dict[str, Any]) -> list[str]:
        c = self.config
        if c.schedule != "constant" and c.warmup_steps >= self.decay_steps:
            return [
                f"plugin.lr.warmup_steps ({c.warmup_steps}) must be below the decay steps "
                f"({self.decay_steps}); lower warmup_steps or raise decay_steps/train.max_steps"
            ]
        return []

    @hookimpl
    def trainctl_lr(self, step: int, base_lr: float) -> float:
        min_lr = self.config.min_lr if self.config.min_lr >= 0 else base_lr / 10
        return self.fn(step, lr=base_lr, warmup=self.config.warmup_steps, decay_steps=self.decay_steps,
                       min_lr=min_lr, **self.extra)


SPEC = PluginSpec(name="lr", factory=LRSchedule, config=Config,
                  description="Learning-rate schedule: cosine, linear, constant, wsd or inverse_sqrt, with warmup.")
