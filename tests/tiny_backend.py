"""A third-party backend, written as a package outside trainctl would write it: a tiny
next-token model on a seeded token stream, built on trainctl's shared step machinery
(``trainctl.backends.step``). The conformance tests install it as ``trainctl_tiny`` through the
``trainctl.plugins`` entry point; nothing imports this file directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from trainctl.backends import scoring
from trainctl.backends.device import set_threads
from trainctl.backends.layer_stats import group_norms
from trainctl.backends.optim import from_config
from trainctl.backends.parallel import for_run
from trainctl.backends.step import MicroLoss, OptimizerStep, StepBackend, local_micro_batches
from trainctl.hooks import BackendSpec, hookimpl
from trainctl.kernel.backend import Evaluation, Plan, StepOutput

WEIGHTS = "tiny.safetensors"
EVAL_STEP = 2**31  # a batch key training never reaches


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    vocab: int = 16
    width: int = 16
    context: int = 8  # tokens per row
    dropout: float = 0.1  # so that restoring the RNG matters


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    tokens: int = 4096


class Tiny(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.width)
        self.hidden = nn.Linear(c.width, c.width)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.width, c.vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.hidden(self.embed(x)))))  # (B, T, V)


class TinyBackend(StepBackend):
    def setup(self) -> Plan:
        ctx, train = self.ctx, self.train
        self.cfg = ctx.model
        set_threads(train.threads)
        self.micro = local_micro_batches(train.grad_accum, ctx.dist)
        stream = torch.Generator().manual_seed(ctx.seed)
        # a learnable stream: mostly t -> 3t + 1 (mod vocab), sometimes a random token
        tokens = [0]
        noise = torch.randint(self.cfg.vocab, (ctx.data.tokens,), generator=stream).tolist()
        for i in range(1, ctx.data.tokens):
            tokens.append(noise[i] if i % 5 == 0 else (3 * tokens[-1] + 1) % self.cfg.vocab)
        self.data = torch.tensor(tokens)
        torch.manual_seed(ctx.seed)
        self.model = Tiny(self.cfg).to(self.device)
        self.optimizer = from_config(self.model, ctx.optim, self.device.type)
        placed = for_run(self.model, device=self.device, world_size=ctx.dist.world_size)
        self.stepper = OptimizerStep(optimizer=self.optimizer, params=list(self.model.parameters()),
                                     placement=self.placement, parallel=placed, train=train, dist=ctx.dist,
                                     seed=ctx.seed, loss_terms=ctx.loss_terms)
        n = sum(p.numel() for p in self.model.parameters())
        return Plan(params=n, total_params=n, tokens_per_step=train.batch_size * train.grad_accum * self.cfg.context,
                    summary=f"tiny {self.cfg.width}-wide model on {ctx.data.tokens} tokens")

    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + step * 7919 + micro)
        T = self.cfg.context
        starts = torch.randint(len(self.data) - T - 1, (self.train.batch_size,), generator=g)
        rows = torch.stack([self.data[s : s + T + 1] for s in starts.tolist()]).to(self.device)  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]

    def _loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], with_logits: bool) -> MicroLoss:
        x, y = batch
        logits = model(x)  # (B, T, V)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return MicroLoss(share=ce / self.train.grad_accum, ce=ce, logits=logits, targets=y)

    def train_step(self, step: int) -> StepOutput:
        tokens = self.train.batch_size * self.train.grad_accum * self.cfg.context
        return self.stepper.run([self._batch(step, m) for m in self.micro], self._loss, tokens=tokens)

    def evaluate(self, step: int) -> dict[str, Evaluation]:
        def score(batch: tuple[torch.Tensor, torch.Tensor]) -> scoring.BatchScore:
            logits = self.model(batch[0])
            predictions = (logits, batch[1]) if self.ctx.eval_metrics else (None, None)  # plugins' metrics only
            return scoring.BatchScore(*scoring.top1(logits, batch[1], -1), 1, *predictions)

        batches = [self._batch(EVAL_STEP, k) for k in range(self.train.eval_steps)]
        return scoring.evaluate(self.model, {"val": batches}, score, self.stepper.autocast, self.device,
                                metrics=self.ctx.eval_metrics)

    def save(self, directory: Path) -> None:
        if self.stepper.save(directory):
            save_model(self.model, str(directory / WEIGHTS))

    def load(self, directory: Path) -> None:
        load_model(self.model, str(directory / WEIGHTS), device=str(self.device))
        self.stepper.load(directory)

    def generate(self, prompt: str, **kwargs: object) -> str:
        return prompt

    def layer_stats(self) -> dict[str, float]:
        return group_norms({"embedding": [self.model.embed.weight], "head": list(self.model.head.parameters())})

    def measure(self, steps: int = 2) -> float:
        return self.stepper.measure(self._batch(0, 0), self._loss, steps=steps, micro_batches=len(self.micro))


@hookimpl
def trainctl_register_backends(register):
    register(BackendSpec(name="tiny", factory="trainctl_tiny:TinyBackend", model_config=ModelConfig,
                         data_config=DataConfig, description="a third-party test backend on the shared step"))
