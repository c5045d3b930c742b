"""Asynchronous GRPO generation (``[hf.grpo] max_staleness = k > 0``): a generator thread with its
own copy of the policy makes the next batches while the trainer trains on the current one.

    trainer (kernel thread)                       generator (thread "trainctl-grpo-generator")
    next_rollout(step): wait for batch `step`     for n = start, start + 1, ...:
    for_training: IS ratio if the batch is stale      wait until published version >= n - k (or stop)
    train the update                                  copy the published weights if newer (by version)
    publish(version): copy params -> staging          generate and score batch n (TRL), behaviour log-probs
                                                      queue it, tagged with the weights' version

Batch n trains step n, so its staleness is ``n - version <= k`` by construction (the kernel's drop
rule still guards it). The generator copies weights only between generations, from a staging
copy that ``publish`` fills under a lock after the optimizer step: it never reads weights
mid-update. Each side has its own TRL ``GRPOTrainer`` (``grpo.InProcessRollouts``): the generator's
prepares batches (sampler, generation, rewards, advantages, reference log-probs; the reference
model is shared, it is only read), the trainer's computes the loss. A step is one generation
(``num_iterations = 1``, ``steps_per_generation = grad_accum``; other settings are refused).

Importance sampling, TRL's ``vllm_importance_sampling_*`` semantics: the generator's log-probs of
its own completions are the behaviour policy's (TRL's ``sampling_per_token_logps``, from vLLM
there); for a stale batch the trainer computes the old policy's log-probs with its current
weights (TRL's ``old_per_token_logps``) and the ratio exp(old - sampling), per token or summed per
sequence, truncated or masked at [clip_min, clip_max], multiplies the per-token loss in TRL's own
``_compute_loss``. The ratio's computation is reproduced from ``_generate_and_score_completions``
(trl 0.x, grpo_trainer.py, "Compute the importance sampling ratio when using vLLM"), where it is
not callable on its own; a batch of the current version has ratio 1 (behaviour = old policy).

A checkpoint holds the policy, optimizer and RNG as synchronous runs do, and the prompt stream's
position after the last batch handed to the trainer; batches generated but not trained are
discarded, and a resumed run regenerates them from the saved policy (so its first batch has
staleness 0).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from trainctl.backends.hf.config import GRPOConfig
from trainctl.backends.hf.grpo import InProcessRollouts
from trainctl.backends.hf.grpo_state import ProducerState
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.rollout import Rollout

WAIT_POLL_S = 0.1  # condition waits wake this often to notice a stop


@dataclass(kw_only=True, slots=True)
class Generated:
    """One generation, as the generator queued it."""

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


class AsyncRollouts:
    """A :class:`trainctl.kernel.rollout.Producer` whose batches are made ahead by a generator
    thread, at most ``max_staleness`` versions behind the trainer's policy."""

    def __init__(self, *, trainer_side: InProcessRollouts, generator_side: InProcessRollouts, opts: GRPOConfig,
                 grad_accum: int) -> None:
        self.loss_side, self.gen = trainer_side, generator_side
        self.trainer, self.model = trainer_side.trainer, trainer_side.model  # what grpo_backend reads
        self.max_staleness = opts.max_staleness
        self.opts, self.grad_accum = opts, grad_accum
        self.trainer.vllm_importance_sampling_correction = opts.importance_sampling_correction  # read by loss()
        if trainer_side.trainer.ref_model is not None:
            generator_side.trainer.ref_model = trainer_side.trainer.ref_model  # read-only: one copy
        self.gen.model.requires_grad_(False)
        trained = [p for p in self.model.parameters()]
        self.staging = [p.detach().clone() for p in trained]  # the published weights
        self.pairs = list(zip(trained, self.staging, self.gen.model.parameters()))
        self.cond = threading.Condition()
        self.queue: dict[int, Generated] = {}  # batch index -> generation
        self.published = 0  # version in staging
        self.gen_version = 0  # version in the generator's copy
        self.next_index = 0  # the batch the generator makes next
        self.paused = self.stopping = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.position: ProducerState = trainer_side.state()  # the stream after the last batch handed out
        self.trainer_clock: Clock | None = None
        self.generator_clock: Clock | None = None

    # --- the Producer protocol ----------------------------------------------------------------

    def next_rollout(self, step: int, version: int) -> Rollout:
        """The oldest batch made (batch ``step`` unless one was dropped), waiting for the generator
        if none is ready."""
        if self.thread is None:
            self._start(step, version)
        assert self.trainer_clock is not None and self.generator_clock is not None
        waited = time.perf_counter()
        with self.cond:
            while not self.queue and self.error is None:
                self.cond.wait(WAIT_POLL_S)
            if self.error is not None:
                raise self.error
            done = self.queue.pop(min(self.queue))  # in order: after a dropped batch, the next one
        self.trainer_clock.waiting += time.perf_counter() - waited
        self.position = done.position
        micro = done.micro
        completions = sum(int(inputs["completion_mask"].size(0)) for inputs in micro)
        tokens = sum(int(inputs["completion_mask"].sum()) for inputs in micro)
        rewards = done.metrics.get("reward")
        return Rollout(batch=done, policy_version=done.version, completions=completions, tokens=tokens,
                       generation_s=done.generation_s, stats={"reward": rewards[-1]} if rewards else {},
                       trainer_idle_fraction=self.trainer_clock.fraction(),
                       generator_idle_fraction=self.generator_clock.fraction())

    def publish(self, version: int) -> None:
        """Copy the stepped weights into the staging copy; the generator takes them between generations."""
        with self.cond, torch.no_grad():
            for trained, staged, _ in self.pairs:
                staged.copy_(trained)
            self.published = version
            self.cond.notify_all()

    def hold(self, paused: bool) -> None:
        """Pause (or resume) generation: the generator finishes the batch under way and waits."""
        with self.cond:
            self.paused = paused
            self.cond.notify_all()

    # --- the trainer's side -----------------------------------------------------------------

    def for_training(self, step: int, rollout: Rollout) -> list[dict[str, Any]]:
        """The micro-batches to train ``step`` on: TRL's generation metrics logged as its own, and
        for a stale batch the old policy's log-probs and the importance-sampling ratio."""
        done: Generated = rollout.batch
        metrics = self.trainer._metrics["train"]
        for name, values in done.metrics.items():
            metrics[name].extend(values)
        stale = step - done.version > 0
        if not self.opts.importance_sampling_correction:
            return [{k: v for k, v in inputs.items() if k != "sampling_per_token_logps"} for inputs in done.micro]
        micro = [self._corrected(inputs, stale) for inputs in done.micro]
        ratios = torch.cat([inputs["importance_sampling_ratio"].flatten() for inputs in micro])
        metrics["sampling/importance_sampling_ratio/mean"].append(float(ratios.mean()))  # host sync: once a step
        metrics["sampling/importance_sampling_ratio/min"].append(float(ratios.min()))
        metrics["sampling/importance_sampling_ratio/max"].append(float(ratios.max()))
        return micro

    def _corrected(self, inputs: dict[str, Any], stale: bool) -> dict[str, Any]:
        opts, mask = self.opts, inputs["completion_mask"]  # (B, C)
        sequence = opts.importance_sampling_mode.startswith("sequence")
        inputs = dict(inputs)
        sampling = inputs.pop("sampling_per_token_logps")
        if not stale:  # behaviour = old policy: TRL's old log-probs are the current ones, ratio 1
            inputs["importance_sampling_ratio"] = torch.ones(mask.size(0), 1 if sequence else mask.size(1),
                                                             device=mask.device)
            return inputs
        with torch.no_grad():
            old = self.loss_side.logps(self.model, inputs)  # (B, C), the trainer's weights
        # from TRL's _generate_and_score_completions ("importance sampling ratio when using vLLM")
        diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
        if sequence:
            diff = diff.sum(dim=-1, keepdim=True)  # (B, 1)
        ratio = torch.exp(diff)
        low = opts.importance_sampling_clip_min or None
        if opts.importance_sampling_mode.endswith("truncate"):
            ratio = torch.clamp(ratio, min=low, max=opts.importance_sampling_clip_max)
        else:
            lowest = low if low is not None else -math.inf
            ratio = ratio.masked_fill((ratio < lowest) | (ratio > opts.importance_sampling_clip_max), 0.0)
        inputs["old_per_token_logps"], inputs["importance_sampling_ratio"] = old, ratio
        return inputs

    # --- the generator ------------------------------------------------------------------------

    def _start(self, step: int, version: int) -> None:
        self.next_index, self.published = step, version
        self.gen.restore(replace(self.position, buffered=None))  # the stream after the last trained batch
        self.publish(version)
        self.trainer_clock, self.generator_clock = Clock(), Clock()
        self.thread = threading.Thread(target=self._run, name="trainctl-grpo-generator", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while self._wait_for_turn():
                self._take_weights()
                started = time.perf_counter()
                done = self._generate()
                done.generation_s = time.perf_counter() - started
                with self.cond:
                    self.queue[self.next_index] = done
                    self.next_index += 1
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer, which ends the run with it
            with self.cond:
                self.error = exc if isinstance(exc, ConfigError) else RuntimeError(
                    f"the GRPO generator thread failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                self.cond.notify_all()

    def _wait_for_turn(self) -> bool:
        """Block until batch ``next_index`` may start (its weights at most k behind); False: stop."""
        assert self.generator_clock is not None
        waited = time.perf_counter()
        with self.cond:
            while not self.stopping and (self.paused or self.published < self.next_index - self.max_staleness):
                self.cond.wait(WAIT_POLL_S)
        self.generator_clock.waiting += time.perf_counter() - waited
        return not self.stopping

    def _take_weights(self) -> None:
        with self.cond, torch.no_grad():
            if self.gen_version != self.published:
                for _, staged, copy in self.pairs:
                    copy.copy_(staged)
                self.gen_version = self.published

    def _generate(self) -> Generated:
        gen = self.gen
        rollout = gen.next_rollout(self.next_index, self.gen_version)
        micro = rollout.batch
        if self.opts.importance_sampling_correction:
            with torch.no_grad():
                for inputs in micro:  # the behaviour policy's log-probs (TRL's sampling_per_token_logps)
                    inputs["sampling_per_token_logps"] = gen.logps(gen.model, inputs)
        metrics = {name: list(values) for name, values in gen.trainer._metrics["train"].items() if values}
        gen.trainer._metrics["train"].clear()
        return Generated(micro=micro, version=self.gen_version, metrics=metrics,
                         position=replace(gen.state(), buffered=None), generation_s=0.0)

    # --- state and shutdown -------------------------------------------------------------------

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
        return self.loss_side.step_metrics()

    def loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        """TRL's ``_compute_loss``, which multiplies the per-token loss by the ratio only when it
        generated with vLLM: ``use_vllm`` is set for the call (nothing else of it reads the flag)."""
        trainer = self.trainer
        trainer.use_vllm = "importance_sampling_ratio" in inputs
        try:
            return self.loss_side.loss(model, inputs)
        finally:
            trainer.use_vllm = False

    def close(self) -> None:
        """Stop the generator (after the generation under way) and join it."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
        self.gen.close()
        self.loss_side.close()
