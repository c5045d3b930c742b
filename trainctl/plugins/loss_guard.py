"""Loss stability: count the updates the backend skipped, give up after too many in a row, and
report (optionally skip) loss spikes.

**Non-finite updates.** The backend never applies an update whose loss or gradient norm is not
finite (the Backend contract; the shared step machinery decides it on the device, without a
host sync). It keeps two device counters that the kernel reads with the loss on logged steps,
as ``StepEnd`` fields: ``skipped_updates`` (since the process started) and ``skip_streak_max``
(the longest run of consecutive skipped updates). This plugin reports new skips as a
``skipped_update`` notice and stops the run as ``failed`` once the longest streak reaches
``max_skips``; it notices at the next logged step, so at most ``train.log_interval`` steps
later. A backend without the counters (``None``) is judged by the ``skipped`` flag of logged
steps alone.

**Spikes.** A logged loss above ``mean + spike_sigma * std`` of the last ``spike_window`` logged
losses (once ``spike_min_history`` are known) is reported as a ``loss_spike`` notice and kept out
of the window. Only logged losses are visible to the host, so the step that showed the spike is
already applied. With ``skip_spikes = true`` the threshold is enforced on the device from then
on: a micro-batch whose mean cross-entropy exceeds it turns the step's loss into NaN (a loss term of NaN or
0, chosen by ``torch.where``, no sync), so the backend skips that update like any non-finite one,
and such skips count towards ``max_skips``: a loss that stays above the threshold fails the run
instead of training on.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import Control, Notice, RunStart, RunView, StepEnd


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    max_skips: int = 5  # consecutive skipped updates before the run fails
    spike_window: int = 50  # logged losses in the rolling window
    spike_sigma: float = 6.0  # k in mean + k * std
    spike_min_history: int = 10  # logged losses needed before spikes are judged
    skip_spikes: bool = False  # skip updates whose loss exceeds the spike threshold

    def __post_init__(self) -> None:
        if self.max_skips < 1 or self.spike_window < 2 or self.spike_min_history < 2:
            raise ValueError("max_skips must be at least 1, spike_window and spike_min_history at least 2")
        if self.spike_sigma <= 0:
            raise ValueError("spike_sigma must be positive")


class LossGuard:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.c, self.run = config, run
        self.window: deque[float] = deque(maxlen=config.spike_window)
        self.device_total = 0.0  # the backend's counter as last read (it restarts with the process)
        self.skipped_total = 0  # across resumes
        self.streak = 0  # for backends without counters: consecutive logged skips
        self.failure: str | None = None
        self.ceiling: float | None = None  # the spike threshold, once known

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        self.device_total = 0.0

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        if not event.logged:
            return
        self._skips(event)
        loss = event.loss
        if loss is None or not math.isfinite(loss):
            return
        if len(self.window) >= self.c.spike_min_history:
            threshold = self._threshold()
            if loss > threshold:
                self._notice(event.step, notices.LOSS_SPIKE, f"loss {loss:.4f} above {threshold:.4f} (mean + {self.c.spike_sigma:g} std of the last {len(self.window)} logged)",
                             loss=loss, threshold=threshold)
                return  # a spike stays out of the window it is judged by
        self.window.append(loss)
        if len(self.window) >= self.c.spike_min_history:
            self.ceiling = self._threshold()

    def _threshold(self) -> float:
        return statistics.fmean(self.window) + self.c.spike_sigma * statistics.pstdev(self.window)

    def _skips(self, event: StepEnd) -> None:
        total = event.skipped_updates
        if total is not None:
            new = int(total - self.device_total)
            self.device_total = total
            streak = event.skip_streak_max or 0
        else:
            new = int(event.skipped)
            self.streak = self.streak + 1 if event.skipped else 0
            streak = self.streak
        if new > 0:
            self.skipped_total += new
            self._notice(event.step, notices.SKIPPED_UPDATE, f"{new} update(s) skipped (non-finite loss or gradient norm); {self.skipped_total} in all",
                         new=new, total=self.skipped_total)
        if streak >= self.c.max_skips and self.failure is None:
            self.failure = (
                f"loss guard: {streak} updates in a row were skipped (non-finite loss or gradient norm, "
                f"or loss spikes) by step {event.step}; lower optim.lr or check the data, then resume from a checkpoint"
            )

    @hookimpl
    def trainctl_control(self, view: RunView) -> Control | None:
        return Control(stop=True, failed=True, reason=self.failure) if self.failure else None

    def _notice(self, step: int, kind: str, message: str, **data: Any) -> None:
        self.run.emit(Notice(step=step, kind=kind, message=message, data=data, time=time.time()))

    @hookimpl
    def trainctl_state_dict(self) -> dict[str, Any]:
        return {"loss_guard": {"window": list(self.window), "skipped_total": self.skipped_total}}

    @hookimpl
    def trainctl_load_state_dict(self, states: dict[str, Any]) -> None:
        mine = states.get("loss_guard") or {}
        self.window.extend(float(v) for v in mine.get("window", []))
        self.skipped_total = int(mine.get("skipped_total", 0))
        if len(self.window) >= self.c.spike_min_history:
            self.ceiling = self._threshold()


class SpikeSkippingGuard(LossGuard):
    """The guard with ``skip_spikes``: also a loss term, so that it costs nothing when off."""

    @hookimpl
    def trainctl_loss_terms(self, logits: Any, targets: Any, loss: Any) -> tuple[str, Any] | None:
        if self.ceiling is None:
            return None
        import torch

        base = loss.detach()
        nan = torch.full_like(base, float("nan"))
        return "spike_skip", torch.where(base > self.ceiling, nan, torch.zeros_like(base))


def make(config: Config, run: RunInfo) -> LossGuard:
    return (SpikeSkippingGuard if config.skip_spikes else LossGuard)(config, run)


SPEC = PluginSpec(name="loss_guard", factory=make, config=Config,
                  description="Counts skipped non-finite updates, fails the run after N in a row; reports (optionally skips) loss spikes.")
