"""How often a plugin acts: "every N steps, and at the last step".

Like Ignite's event filters, the schedule is a value the plugin holds, not arithmetic it
re-derives in each hook::

    self.every = Every(config.every)                  # config.every = 0: only at the end
    ...
    if self.every.due(event.step, event.max_steps):
        ...

The last step is ``max_steps``; a run stopped earlier has no "last step" here: act on the
``ending`` state of ``trainctl_control`` for that (see the ``samples`` plugin).
"""

from __future__ import annotations

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
