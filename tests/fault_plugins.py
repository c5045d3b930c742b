"""Plugins that inject faults into a real backend: NaN into the loss or into the gradients."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainctl.hooks import PluginSpec, RunInfo, hookimpl


@dataclass(frozen=True, kw_only=True, slots=True)
class InjectConfig:
    """Poison the training micro-batches whose 0-based call index is in ``calls``."""

    calls: list[int] = field(default_factory=list)
    into: str = "loss"  # loss | grad


class InjectNaN:
    def __init__(self, config: InjectConfig, run: RunInfo) -> None:
        self.c = config
        self.call = -1

    @hookimpl
    def trainctl_loss_terms(self, logits, targets, loss):
        import torch

        self.call += 1
        if self.call not in self.c.calls:
            return "inject", torch.zeros((), device=loss.device)
        if self.c.into == "loss":
            return "inject", torch.full((), float("nan"), device=loss.device)
        # a finite value (0) whose gradient is NaN: d sqrt(|z|)/dz at z = 0 is inf * 0
        z = (logits * 0).sum()
        return "inject", z.abs().sqrt()


@hookimpl
def trainctl_register_plugins(register):
    register(PluginSpec(name="inject_nan", factory=InjectNaN, config=InjectConfig, description="injects NaN"))
