"""The kernel's run state (mutable, owned by the loop alone) and the result of a run."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainctl.hooks.events import RunStatus, RunView


@dataclass(kw_only=True, slots=True)
class RunState:
    """What the loop knows about the run; checkpointed in ``kernel.json``."""

    step: int = 0  # completed optimizer steps
    tokens: int = 0  # cumulative trained tokens, all ranks
    last_loss: float | None = None
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    last_save_step: int = -1
    evaluated_step: int = -1
    started: float = field(default_factory=time.time)

    def view(self, max_steps: int, state: str) -> RunView:
        return RunView(
            step=self.step,
            max_steps=max_steps,
            state=state,
            last_loss=self.last_loss,
            last_val_loss=self.last_val_loss,
            evaluated=self.evaluated_step == self.step,
            time=time.time(),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "last_loss": self.last_loss,
            "last_val_loss": self.last_val_loss,
            "best_val_loss": self.best_val_loss,
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        """From a checkpoint's ``kernel.json`` state, whose types and ranges
        :func:`trainctl.kernel.resume.kernel_problem` has checked."""
        self.step = saved["step"]
        self.tokens = saved["tokens"]
        self.last_loss = saved.get("last_loss")
        self.last_val_loss = saved.get("last_val_loss")
        self.best_val_loss = saved.get("best_val_loss")
        self.last_save_step = self.step


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    """How a run ended. The CLI maps ``failed`` to exit code 1."""

    status: RunStatus
    step: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    reason: str
    out_dir: str
