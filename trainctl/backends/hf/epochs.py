"""Which prepared training rows each micro-batch of a step takes, and how many steps ``epochs``
passes over them are.

Two ways to cross an epoch's end (``data.epoch_end``):

- ``continue`` (the default): the rows are an endless stream of seeded epoch orders, and every
  step takes ``batch_size x grad_accum`` rows of it, running over an epoch's end into the next
  epoch. Every step is full, so every step costs and weighs the same.
- ``short_step`` (transformers' ``Trainer``, so TRL's): each epoch is cut into micro-batches of
  ``batch_size`` rows, the last one shorter, grouped ``grad_accum`` at a time; the last step of an
  epoch takes what is left (fewer or smaller micro-batches). A run of E epochs then has
  ``ceil(E x ceil(ceil(rows / batch_size) / grad_accum))`` steps, as ``Trainer`` counts them.

Both are pure functions of (seed, step), so a resumed run sees the same batches; each epoch's
order is ``data.order``'s (``SFTData.order``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trainctl.kernel.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    n_rows: int  # prepared training rows (after TRL's preparation and packing)
    batch_size: int
    grad_accum: int
    short_step: bool
    shuffle: bool

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> float:
        """Steps in one pass over the rows (a fraction when steps run over the epoch's end)."""
        if self.short_step:
            micro_batches = math.ceil(self.n_rows / self.batch_size)
            return math.ceil(micro_batches / self.grad_accum)
        return self.n_rows / self.rows_per_step

    def steps(self, epochs: float) -> int:
        """The run's length for ``epochs`` passes (at least one step)."""
        return max(math.ceil(epochs * self.steps_per_epoch - 1e-9), 1)  # 1e-9: 3 x 1/3 is not 1.0000001 steps

    def epochs(self, steps: int) -> float:
        """Passes over the rows that ``steps`` steps make."""
        return steps / self.steps_per_epoch

    def step(self, sft: Any, step: int) -> list[list[int]]:
        """Row indices of every micro-batch of ``step``, all ranks' (``sft``: :class:`SFTData`)."""
        if not self.short_step:
            first = step * self.rows_per_step
            return [sft.indices("train", first + m * self.batch_size, self.batch_size, self.shuffle)
                    for m in range(self.grad_accum)]
        per_epoch = int(self.steps_per_epoch)
        epoch, within = divmod(step, per_epoch)
        order = sft.order("train", epoch, self.shuffle)
        start = within * self.rows_per_step
        end = min(start + self.rows_per_step, self.n_rows)
        return [[int(i) for i in order[a : min(a + self.batch_size, end)]] for a in range(start, end, self.batch_size)]

    def step_epochs(self, step: int) -> list[list[int]]:
        """The epoch each row of :meth:`step` is drawn in, micro-batch by micro-batch."""
        if not self.short_step:
            first = step * self.rows_per_step
            return [[(first + m * self.batch_size + j) // self.n_rows for j in range(self.batch_size)]
                    for m in range(self.grad_accum)]
        epoch, within = divmod(step, int(self.steps_per_epoch))
        start = within * self.rows_per_step
        end = min(start + self.rows_per_step, self.n_rows)
        return [[epoch] * (min(a + self.batch_size, end) - a) for a in range(start, end, self.batch_size)]


def check(short_step: bool, world_size: int) -> None:
    if short_step and world_size > 1:
        raise ConfigError(
            'data.epoch_end = "short_step" runs on one process (a short step has fewer micro-batches than ranks); '
            'use "continue" under several processes'
        )
