"""How often a plugin acts: "every N steps, and at the last step".

Like Ignite's event filters, the schedule is a value the plugin holds, not arithmetic it
re-derives in each hook::

    self.every = Every(config.every)                  # config.every = 0: only at the end
    ...
    if self.every.due(event.step, event.max_steps):
        ...

The last step is ``max_steps``; a run stopped earlier has no "last step" here: act on the
``ending`` state of ``trainctl_control`` for that (see the ``samples`` plugin).

The kernel's own evaluation and checkpoint cadence (``train.eval_strategy`` /
``train.save_strategy``) is one of these two schedules: :class:`Every` ``eval_interval`` steps,
or :class:`EpochEnds`, at the step in which each pass over the training data ends (the backend
counts the steps of an epoch: ``Plan.steps_per_epoch``). Both are pure functions of the step, so
a resumed run keeps its cadence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Every:
    """Due at every multiple of ``n`` (``n = 0``: never by count) and, with ``at_end``, at
    ``max_steps``. Steps count completed steps, so the first step is 1."""

    n: int
    at_end: bool = True

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"Every(n) needs n >= 0, got {self.n}")

    def due(self, step: int, max_steps: int) -> bool:
        return (self.n > 0 and step % self.n == 0) or (self.at_end and step == max_steps)

    def describe(self, what: str) -> str:
        return f"{what} every {self.n} steps and at the end" if self.n else f"{what} only at the end"


@dataclass(frozen=True, slots=True)
class EpochEnds:
    """Due at the step in which a pass over the training data ends: every step under
    transformers' ``Trainer``'s short last step (``steps_per_epoch`` whole), else the step that
    takes an epoch's last row. ``Trainer`` evaluates and saves there under
    ``eval_strategy``/``save_strategy = "epoch"`` (``DefaultFlowCallback.on_epoch_end``, fired
    after each epoch's last step and after the step that reached ``max_steps``: the kernel's
    end of run does that one)."""

    steps_per_epoch: float  # > 0; a fraction when steps run over an epoch's end
    at_end: bool = True

    def __post_init__(self) -> None:
        if not self.steps_per_epoch > 0:
            raise ValueError(f"EpochEnds needs steps_per_epoch > 0, got {self.steps_per_epoch}")

    def passes(self, step: int) -> int:
        """Epochs completed after ``step`` steps (1e-9: 3 x 1/3 is a whole epoch)."""
        return math.floor(step / self.steps_per_epoch + 1e-9)

    def due(self, step: int, max_steps: int) -> bool:
        return self.passes(step) > self.passes(step - 1) or (self.at_end and step == max_steps)

    def describe(self, what: str) -> str:
        per = self.steps_per_epoch
        shown = f"{per:g}" if per == int(per) else f"{per:.2f}"
        return f"{what} at each epoch's end (an epoch is {shown} steps) and at the end"


def schedule(strategy: str, interval: int, steps_per_epoch: float) -> Every | EpochEnds:
    """The kernel's cadence for ``train.eval_strategy``/``save_strategy``: ``steps`` every
    ``interval`` steps, ``epoch`` at each epoch's end. The run's end is the kernel's
    (``at_end=False`` here: the loop's ending evaluates and saves once, whichever strategy)."""
    if strategy == "epoch":
        return EpochEnds(steps_per_epoch, at_end=False)
    return Every(interval, at_end=False)
