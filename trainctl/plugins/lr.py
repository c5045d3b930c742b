"""Learning-rate schedules: pure functions of the step, each a few lines, tested point by point.

``step`` is the number of completed updates (0 for the first update); ``lr`` is the peak
(``optim.lr``). Every schedule here warms up linearly over ``warmup`` steps as nanoGPT does.
transformers' schedules (``family = "transformers"``) are transformers' own functions, not
rewritten here: a run converted from a TRL config keeps its learning rate at every step.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from trainctl.hooks import PluginSpec, RunInfo, hookimpl
from trainctl.hooks.events import RunStart
from trainctl.kernel.errors import ConfigError


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

#: Ours, then transformers' ``lr_scheduler_type`` names that are functions of the step
#: (``reduce_lr_on_plateau`` and ``greedy`` follow the loss and are not offered).
Schedule = Literal["cosine", "linear", "constant", "wsd", "inverse_sqrt", "cosine_with_restarts", "polynomial",
                   "constant_with_warmup", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"]


def hf_multiplier(name: str, *, peak: float, warmup: int, total: int, kwargs: dict[str, Any]) -> Callable[[int], float]:
    """transformers' own schedule ``name`` as ``step -> multiplier of the peak lr``: the lambda
    that ``get_scheduler`` puts in its ``LambdaLR`` (built once on a one-tensor dummy optimizer),
    so every step's learning rate is exactly what a Trainer would use for that update. The dummy
    optimizer's lr is the peak: ``polynomial``'s ``lr_end`` and ``min_lr`` are absolute rates."""
    try:
        import torch
        from transformers import get_scheduler
    except ImportError:
        raise ConfigError(f"plugin.lr.schedule {name!r} with family = \"transformers\" needs transformers: pip install 'trainctl[hf]'") from None
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    try:
        scheduler = get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=total,
                                  scheduler_specific_kwargs=dict(kwargs))
    except (TypeError, ValueError) as exc:  # a kwarg the schedule does not take, or a bad value
        raise ConfigError(f"plugin.lr: transformers schedule {name!r}: {str(exc).splitlines()[0]}; check plugin.lr.hf_kwargs") from None
    return scheduler.lr_lambdas[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    # family "nanogpt" (the default): cosine, linear, constant, wsd, inverse_sqrt as written above.
    # family "transformers": any name of transformers' lr_scheduler_type, computed by transformers
    # (warmup from 0, decay to 0 unless the schedule takes a minimum); names only transformers has
    # (cosine_with_min_lr, warmup_stable_decay, ...) always mean transformers' schedule.
    schedule: Schedule = "cosine"
    family: Literal["nanogpt", "transformers"] = "nanogpt"
    warmup_steps: int = 100
    warmup_ratio: float = 0.0  # > 0: warmup = ceil(ratio x the run's steps), as TrainingArguments
    decay_steps: int = 0  # 0 = train.max_steps (the run's steps)
    min_lr: float = -1.0  # nanogpt family; < 0: optim.lr / 10 (nanoGPT, after Chinchilla)
    decay_fraction: float = 0.2  # wsd only
    # transformers family: lr_scheduler_kwargs, e.g. {min_lr_rate = 0.1} or {num_decay_steps = 50}
    hf_kwargs: dict[str, float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be 0 or more")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError("decay_fraction must be in (0, 1]")
        if self.schedule == "wsd" and self.family == "transformers":
            raise ValueError('transformers calls wsd "warmup_stable_decay"; use that name')
        if any(isinstance(v, bool) or not isinstance(v, (int, float, str)) for v in self.hf_kwargs.values()):
            raise ValueError("hf_kwargs values must be numbers or strings")
        if self.hf_kwargs and self.family != "transformers" and self.schedule in SCHEDULES:
            raise ValueError('hf_kwargs are for transformers schedules; set family = "transformers"')

    @property
    def transformers(self) -> bool:
        return self.family == "transformers" or self.schedule not in SCHEDULES


class LRSchedule:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config = config
        self.is_main = run.is_main
        self.fn: Callable[[int, float], float] = lambda step, base_lr: base_lr
        self._resolve(run.max_steps)

    def _resolve(self, max_steps: int) -> None:
        """Fix the schedule's length: at construction, and again when the run starts (a backend
        may derive the run's length from epochs of its data)."""
        c = self.config
        self.max_steps = max_steps
        self.decay_steps = c.decay_steps or max_steps
        self.warmup = math.ceil(self.decay_steps * c.warmup_ratio) if c.warmup_ratio else c.warmup_steps
        if c.transformers:
            built: dict[float, Callable[[int], float]] = {}  # per peak lr: built once, on first use

            def fn(step: int, base_lr: float) -> float:
                if base_lr not in built:
                    built[base_lr] = hf_multiplier(c.schedule, peak=base_lr, warmup=self.warmup,
                                                   total=self.decay_steps, kwargs=c.hf_kwargs)
                return base_lr * built[base_lr](step)

            self.fn = fn
            fn(0, 1.0)  # before training: transformers missing, or a kwarg the schedule does not take
        else:
            extra = {"decay_fraction": c.decay_fraction} if c.schedule == "wsd" else {}
            schedule = SCHEDULES[c.schedule]
            self.fn = lambda step, base_lr: schedule(
                step, lr=base_lr, warmup=self.warmup, decay_steps=self.decay_steps,
                min_lr=c.min_lr if c.min_lr >= 0 else base_lr / 10, **extra)

    def too_long_warmup(self) -> str:
        """A warmup at least as long as the run is legal (smoke runs shorten runs all the time):
        the learning rate simply never leaves warmup. Said once, on stderr."""
        if self.warmup < self.decay_steps:
            return ""
        return (f"plugin.lr warmup ({self.warmup} steps) is not shorter than the schedule ({self.decay_steps} steps): "
                "the learning rate never leaves warmup; lower plugin.lr.warmup_steps for a full schedule")

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        if event.max_steps != self.max_steps:
            self._resolve(event.max_steps)
        warning = self.too_long_warmup()  # here: the run's length is final (a backend may derive it)
        if warning and self.is_main and event.start_step == 0:
            print(f"trainctl: warning: {warning}", file=sys.stderr)

    @hookimpl
    def trainctl_lr(self, step: int, base_lr: float) -> float:
        return self.fn(step, base_lr)


def describe(config: Config, max_steps: int) -> str:
    """One line for the plan: the schedule, its warmup and what differs from TRL's defaults."""
    decay = config.decay_steps or max_steps
    warmup = math.ceil(decay * config.warmup_ratio) if config.warmup_ratio else config.warmup_steps
    family = "transformers" if config.transformers else "nanoGPT"
    line = f"{config.schedule} ({family}'s), warmup {warmup} steps"
    if not config.warmup_ratio and config.warmup_steps == 100:
        line += " (trainctl's default; TRL's is 0)"
    if warmup >= decay:
        line += f": not shorter than the {decay}-step schedule, the rate never leaves warmup"
    return line


SPEC = PluginSpec(name="lr", factory=LRSchedule, config=Config,
                  description="Learning-rate schedule with warmup: nanoGPT's cosine, linear, constant, wsd, "
                              "inverse_sqrt, or any of transformers' schedules by name.")
