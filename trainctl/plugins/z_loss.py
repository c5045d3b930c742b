"""z-loss (PaLM): ``coef * mean(logsumexp(logits)^2)`` keeps the softmax normaliser near 1 and
the logits from drifting, which steadies long runs. A loss term: training only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainctl.hooks import PluginSpec, RunInfo, hookimpl


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    coef: float = 1e-4

    def __post_init__(self) -> None:
        if self.coef <= 0:
            raise ValueError("coef must be positive")


class ZLoss:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.coef = config.coef

    @hookimpl
    def trainctl_loss_terms(self, logits: Any, targets: Any, loss: Any) -> tuple[str, Any]:
        z = logits.float().logsumexp(dim=-1)  # (B, T)
        valid = (targets >= 0).float()  # ignored positions are negative (-1 or -100)
        return "z_loss", self.coef * (z.square() * valid).sum() / valid.sum().clamp(min=1)


SPEC = PluginSpec(name="z_loss", factory=ZLoss, config=Config,
                  description="Adds PaLM's z-loss to the training loss (a loss term; off in evaluation).")
