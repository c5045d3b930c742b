"""A tiny, fast backend with no model: deterministic losses from the step, so kernel tests run
the real loop, bus and plugins in milliseconds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainctl.hooks import BackendSpec, hookimpl
from trainctl.kernel.backend import BackendContext, Plan, StepOutput
from trainctl.kernel.rollout import Rollout


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


@dataclass(frozen=True, kw_only=True, slots=True)
class FakeRolloutModelConfig:
    width: int = 4
    max_staleness: int = 0
    lag: tuple[int, ...] = ()  # versions behind of the batches the producer hands out, in turn (then 0)


class FakeProducer:
    """Hands out batches ``lag[i]`` versions behind the trainer, and records what it was told."""

    def __init__(self, max_staleness: int, lag: tuple[int, ...]) -> None:
        self.max_staleness, self.lag = max_staleness, list(lag)
        self.asked: list[tuple[int, int]] = []  # (step, version) of each next_rollout
        self.published: list[int] = []
        self.held: list[bool] = []  # hold() calls: True when paused, False when resumed

    def next_rollout(self, step: int, version: int) -> Rollout:
        self.asked.append((step, version))
        behind = self.lag.pop(0) if self.lag else 0
        return Rollout(batch=float(step), policy_version=version - behind, completions=4, tokens=12,
                       generation_s=0.001, stats={"reward": 0.5})

    def publish(self, version: int) -> None:
        self.published.append(version)

    def hold(self, paused: bool) -> None:
        self.held.append(paused)


class FakeRolloutBackend(FakeBackend):
    """The fake backend trained by a producer instead of its steps (``trainctl.kernel.rollout``)."""

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.producer = FakeProducer(ctx.model.max_staleness, ctx.model.lag)
        self.trained_on: list[float] = []

    def train_step(self, step: int) -> StepOutput:
        raise AssertionError("a rollout backend is trained through train_rollout")

    def rollout_producer(self) -> FakeProducer:
        return self.producer

    def train_rollout(self, step: int, rollout: Rollout) -> StepOutput:
        self.trained_on.append(rollout.batch)
        return super().train_step(step)


@hookimpl
def trainctl_register_backends(register):
    register(BackendSpec(name="fake_rollout", factory="tests.fake_backend:FakeRolloutBackend",
                         model_config=FakeRolloutModelConfig, data_config=FakeDataConfig,
                         description="test backend trained on a producer's rollouts"))
    register(BackendSpec(name="fake", factory="tests.fake_backend:FakeBackend",
                         model_config=FakeModelConfig, data_config=FakeDataConfig,
                         description="test backend"))
