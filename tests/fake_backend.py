"""A tiny, fast backend with no model: deterministic losses from the step, so kernel tests run
the real loop, bus and plugins in milliseconds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainctl.hooks import BackendSpec, hookimpl
from trainctl.kernel.backend import BackendContext, Plan, StepOutput


@dataclass(frozen=True, kw_only=True, slots=True)
class FakeModelConfig:
    width: int = 4


@dataclass(frozen=True, kw_only=True, slots=True)
class FakeDataConfig:
    path: str = ""
    steps_per_epoch: float = 0.0  # > 0: the fake data has epochs of this many steps


class FakeBackend:
    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.lrs: list[float] = []
        self.steps: list[int] = []
        self.weight = torch.zeros(())
        self.fail_at: int | None = None
        self.val_losses: dict[int, float] = {}  # step -> val loss, instead of the default curve

    def setup(self) -> Plan:
        return Plan(params=10, total_params=10, tokens_per_step=8, summary="fake",
                    steps_per_epoch=self.ctx.data.steps_per_epoch)

    def set_lr(self, lr: float) -> None:
        self.lrs.append(lr)

    def train_step(self, step: int) -> StepOutput:
        if self.fail_at == step:
            raise RuntimeError("boom")
        self.steps.append(step)
        self.weight += 1
        loss = torch.tensor(10.0 / (step + 1))
        return StepOutput(loss=loss, grad_norm=torch.tensor(1.0), tokens=8)

    def evaluate(self, step: int) -> dict[str, float]:
        return {"train": 1.0 / (step + 1), "val": self.val_losses.get(step, 2.0 / (step + 1))}

    def save(self, directory: Path) -> None:
        (directory / "fake.json").write_text(json.dumps({"weight": float(self.weight)}))

    def load(self, directory: Path) -> None:
        self.weight = torch.tensor(json.loads((directory / "fake.json").read_text())["weight"])

    def generate(self, prompt: str, **kwargs) -> str:
        return prompt[::-1]

    def measure(self, steps: int) -> float:
        return 0.001

    def close(self) -> None:
        pass


@hookimpl
def trainctl_register_backends(register):
    register(BackendSpec(name="fake", factory="tests.fake_backend:FakeBackend",
                         model_config=FakeModelConfig, data_config=FakeDataConfig,
                         description="test backend"))
