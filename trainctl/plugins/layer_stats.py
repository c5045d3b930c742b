"""Per-layer weight and gradient norms every N steps, from the backend's ``layer_stats()``,
emitted as a ``layer_stats`` notice: ``data`` maps ``"layer.N.weight_norm"``,
``"layer.N.grad_norm"``, ``"embedding.*"``, ``"head.*"`` to floats. The prometheus plugin exports
them as ``trainctl_layer_weight_norm{layer=...}`` / ``trainctl_layer_grad_norm``; tensorboard,
wandb, csv and jsonl record them.

Reading the norms is a host sync, paid only on the steps that ask (``every``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from trainctl.hooks import Every, PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import Notice, StepEnd


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    every: int = 100  # steps between measurements

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("every must be at least 1")


class LayerStats:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.every, self.run = Every(config.every, at_end=False), run
        self.main = run.is_main  # every rank computes (a collective under FSDP), the main rank reports

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        if not self.every.due(event.step, event.max_steps):
            return
        stats = self.run.layer_stats()  # gradients of this step are still there
        if not self.main:
            return
        grads = {k.removesuffix(".grad_norm"): v for k, v in stats.items() if k.endswith(".grad_norm")}
        top = max(grads, key=grads.get) if grads else None
        message = f"{len(stats)} norms" + (f"; largest gradient norm {grads[top]:.3g} in {top}" if top else "")
        self.run.emit(Notice(step=event.step, kind=notices.LAYER_STATS, message=message, data=dict(stats), time=time.time()))


SPEC = PluginSpec(name="layer_stats", factory=LayerStats, config=Config,
                  description="Every N steps, per-layer weight and gradient norms as a 'layer_stats' event (and metrics).")
