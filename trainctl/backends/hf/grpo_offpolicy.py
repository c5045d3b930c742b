"""What every GRPO producer that generates ahead of the trainer shares (``[hf.grpo]
max_staleness = k > 0``): a generator thread in process (``grpo_async.py``) or rollout-worker
processes over loopback (``grpo_remote.py``).

The generator's side, ``prepare_generator`` and ``generate``: one batch of TRL's prepared
micro-batches from a policy copy at some version, with the behaviour policy's log-probs (TRL's
``sampling_per_token_logps``, recorded during generation: ``behaviour_logps.py``) and TRL's
generation metrics.

The trainer's side, :class:`OffPolicyRollouts`: the batches handed out in order with the idle
fractions, the importance-sampling correction of a stale batch, TRL's loss with the ratio, and
the checkpoint's part (the prompt stream after the last batch handed out; pending batches are
discarded and regenerated after a resume).

Importance sampling, TRL's ``vllm_importance_sampling_*`` semantics: for a stale batch the ratio
exp(old - sampling) of the old policy (TRL's ``old_per_token_logps``: the trainer's current
weights) to the behaviour policy, per token or summed per sequence, truncated or masked at
[clip_min, clip_max], multiplies the per-token loss in TRL's own ``_compute_loss``. With
``num_iterations = 1`` the old log-probs are the loss's own forward's (TRL's default when a batch
has none), so the ratio is made from that forward, not from one more. The ratio's computation is
reproduced from ``_generate_and_score_completions`` (trl 1.16, grpo_trainer.py, "Compute the
importance sampling ratio when using vLLM"), where it is not callable on its own; a batch of the
current version has ratio 1 (behaviour = old policy).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from trainctl.backends.hf import behaviour_logps
from trainctl.backends.hf.config import GRPOConfig
from trainctl.backends.hf.grpo import InProcessRollouts
from trainctl.backends.hf.grpo_state import ProducerState
from trainctl.kernel.rollout import Rollout

POLL_S = 0.1  # condition waits wake this often to notice a stop


@dataclass(kw_only=True, slots=True)
class Generated:
    """One generation, as the generator made it."""

    micro: list[dict[str, Any]]  # grad_accum micro-batches, TRL's inputs + sampling_per_token_logps
    version: int
    metrics: dict[str, list[float]]  # TRL's generation metrics (reward, lengths, num_tokens)
    position: ProducerState  # the prompt stream after it (buffered=None)
    generation_s: float


@dataclass(kw_only=True, slots=True)
class Clock:
    """Seconds spent waiting, of the wall time since ``started``."""

    started: float = field(default_factory=time.perf_counter)
    waiting: float = 0.0

    def fraction(self) -> float:
        wall = time.perf_counter() - self.started
        return self.waiting / wall if wall > 0 else 0.0


def prepare_generator(gen: InProcessRollouts, opts: GRPOConfig) -> None:
    """Freeze ``gen``'s policy copy; with the importance-sampling correction on, its generations
    carry the behaviour log-probs, taken from ``generate``'s own forwards."""
    gen.model.requires_grad_(False)
    if opts.importance_sampling_correction:
        behaviour_logps.record(gen.trainer, gen.model)  # the model generate() runs (LoRA is refused here)


def generate(gen: InProcessRollouts, index: int, version: int) -> Generated:
    """Batch ``index`` from ``gen``'s policy, which is at ``version`` (prepared by ``prepare_generator``)."""
    started = time.perf_counter()
    micro = gen.next_rollout(index, version).batch
    metrics = {name: list(values) for name, values in gen.trainer._metrics["train"].items() if values}
    gen.trainer._metrics["train"].clear()
    return Generated(micro=micro, version=version, metrics=metrics, position=replace(gen.state(), buffered=None),
                     generation_s=time.perf_counter() - started)


class OffPolicyRollouts:
    """The trainer's half of a :class:`trainctl.kernel.rollout.Producer` whose batches another
    policy copy made; a subclass says where they come from (``next_rollout``, ``publish``,
    ``close``), queues them by index under ``cond`` and hands each one out through ``handed``."""

    def __init__(self, *, trainer_side: InProcessRollouts, opts: GRPOConfig, grad_accum: int) -> None:
        self.loss_side = trainer_side
        self.trainer, self.model = trainer_side.trainer, trainer_side.model  # what grpo_backend reads
        self.max_staleness = opts.max_staleness
        self.opts, self.grad_accum = opts, grad_accum
        self.trainer.vllm_importance_sampling_correction = opts.importance_sampling_correction  # read by loss()
        self.position: ProducerState = trainer_side.state()  # the stream after the last batch handed out
        self.trainer_clock: Clock | None = None
        self.generator_clock: Clock | None = None
        self.cond = threading.Condition()
        self.queue: dict[int, Generated] = {}  # batch index -> generation
        self.published = 0  # the version the generators may take
        self.paused = self.stopping = False
        self.error: BaseException | None = None  # a generator's failure, raised to the trainer
        self.ratios: list[torch.Tensor] = []  # the step's importance-sampling ratios, for its metrics

    def hold(self, paused: bool) -> None:
        """Pause (or resume) generation: a generation under way is finished, no other starts."""
        with self.cond:
            self.paused = paused
            self.cond.notify_all()

    def may_start(self, n: int) -> bool:
        """Block until batch ``n`` may be generated (weights at most k behind it are published,
        the run is not paused); False: stop."""
        with self.cond:
            while not self.stopping and (self.paused or self.published < n - self.max_staleness):
                self.cond.wait(POLL_S)
        return not self.stopping

    def handed(self, done: Generated, *, waited_s: float, generator_idle: float | None,
               workers_up: int | None = None) -> Rollout:
        """``done`` as the kernel's rollout, the stream's position moved past it."""
        assert self.trainer_clock is not None
        self.trainer_clock.waiting += waited_s
        self.position = done.position
        completions = sum(int(inputs["completion_mask"].size(0)) for inputs in done.micro)
        tokens = sum(int(inputs["completion_mask"].sum()) for inputs in done.micro)
        rewards = done.metrics.get("reward")
        return Rollout(batch=done, policy_version=done.version, completions=completions, tokens=tokens,
                       generation_s=done.generation_s, stats={"reward": rewards[-1]} if rewards else {},
                       trainer_idle_fraction=self.trainer_clock.fraction(), generator_idle_fraction=generator_idle,
                       workers_up=workers_up)

    def for_training(self, step: int, rollout: Rollout) -> list[dict[str, Any]]:
        """The micro-batches to train ``step`` on, TRL's generation metrics logged as its own; a
        stale batch keeps the behaviour log-probs, from which ``loss`` makes its ratio."""
        done: Generated = rollout.batch
        metrics = self.trainer._metrics["train"]
        for name, values in done.metrics.items():
            metrics[name].extend(values)
        if not self.opts.importance_sampling_correction:
            return [{k: v for k, v in inputs.items() if k != "sampling_per_token_logps"} for inputs in done.micro]
        if step - done.version > 0:
            return done.micro
        micro = []
        for inputs in done.micro:  # behaviour = old policy: TRL's old log-probs are the current ones, ratio 1
            mask = inputs["completion_mask"]
            ones = torch.ones(mask.size(0), 1 if self._sequence_level() else mask.size(1), device=mask.device)
            micro.append({**{k: v for k, v in inputs.items() if k != "sampling_per_token_logps"},
                          "importance_sampling_ratio": ones})
            self.ratios.append(ones.flatten())
        return micro

    def _sequence_level(self) -> bool:
        return self.opts.importance_sampling_mode.startswith("sequence")

    def _ratio(self, old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """TRL's importance-sampling ratio of the old policy (the trainer's weights) to the
        behaviour policy, from ``_generate_and_score_completions`` ("importance sampling ratio
        when using vLLM"); its metric takes the ratios of real tokens (or of sequences)."""
        opts = self.opts
        diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
        if self._sequence_level():
            diff = diff.sum(dim=-1, keepdim=True)  # (B, 1)
        ratio = torch.exp(diff)
        low = opts.importance_sampling_clip_min or None
        if opts.importance_sampling_mode.endswith("truncate"):
            ratio = torch.clamp(ratio, min=low, max=opts.importance_sampling_clip_max)
        else:
            lowest = low if low is not None else -math.inf
            ratio = ratio.masked_fill((ratio < lowest) | (ratio > opts.importance_sampling_clip_max), 0.0)
        self.ratios.append(ratio.flatten() if self._sequence_level() else ratio[mask.bool()])
        return ratio

    # --- state ---------------------------------------------------------------------------------

    def state(self) -> ProducerState:
        """The stream after the last batch handed to the trainer; pending batches are not kept."""
        return self.position

    def restore(self, state: ProducerState) -> None:
        self.position = replace(state, buffered=None)
        self.loss_side.restore(replace(state, buffered=None, consumed=0))  # counters only: it reads no prompts

    def dataloader(self) -> Any:
        return self.loss_side.dataloader()

    def generator(self) -> torch.Generator | None:
        return self.loss_side.generator()

    def step_metrics(self) -> dict[str, float]:
        """TRL's metrics of the step, with the importance-sampling ratios' under TRL's names."""
        if self.ratios:
            ratios, metrics = torch.cat(self.ratios), self.trainer._metrics["train"]
            self.ratios = []
            if ratios.numel():
                metrics["sampling/importance_sampling_ratio/mean"].append(float(ratios.mean()))  # host sync: once a step
                metrics["sampling/importance_sampling_ratio/min"].append(float(ratios.min()))
                metrics["sampling/importance_sampling_ratio/max"].append(float(ratios.max()))
        return self.loss_side.step_metrics()

    def loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        """TRL's ``_compute_loss``, which multiplies the per-token loss by the ratio only when it
        generated with vLLM: ``use_vllm`` is set for the call (nothing else of it reads the flag).

        For a stale batch the old policy is the trainer's current one (``num_iterations = 1``):
        its log-probs are those of the loss's own forward, where TRL takes them when the batch has
        no ``old_per_token_logps``, so the ratio is made from that forward's result as it returns
        (``_compute_loss`` reads the ratio after it) instead of by a forward of its own."""
        trainer = self.trainer
        trainer.use_vllm = "importance_sampling_ratio" in inputs or "sampling_per_token_logps" in inputs
        if "sampling_per_token_logps" in inputs:
            inputs = dict(inputs)
            sampling, forward = inputs.pop("sampling_per_token_logps"), trainer._get_per_token_logps_and_entropies

            def with_ratio(*args: Any, **kwargs: Any) -> Any:
                found = forward(*args, **kwargs)
                inputs["importance_sampling_ratio"] = self._ratio(found[0].detach(), sampling, inputs["completion_mask"])
                return found

            trainer._get_per_token_logps_and_entropies = with_ratio
        try:
            return self.loss_side.loss(model, inputs)
        finally:
            trainer.use_vllm = False
            vars(trainer).pop("_get_per_token_logps_and_entropies", None)
