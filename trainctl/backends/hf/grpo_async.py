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

The importance-sampling correction of stale batches and the checkpoint's part are the trainer's
side, shared with the rollout workers' producer (``grpo_offpolicy.py``). A checkpoint holds the
policy, optimizer and RNG as synchronous runs do, and the prompt stream's position after the
last batch handed to the trainer; batches generated but not trained are discarded, and a
resumed run regenerates them from the saved policy (so its first batch has staleness 0).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import torch

from trainctl.backends.hf.config import GRPOConfig
from trainctl.backends.hf.grpo import InProcessRollouts
from trainctl.backends.hf.grpo_offpolicy import POLL_S, Clock, OffPolicyRollouts, generate, prepare_generator
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.rollout import Rollout


class AsyncRollouts(OffPolicyRollouts):
    """A :class:`trainctl.kernel.rollout.Producer` whose batches are made ahead by a generator
    thread, at most ``max_staleness`` versions behind the trainer's policy."""

    def __init__(self, *, trainer_side: InProcessRollouts, generator_side: InProcessRollouts, opts: GRPOConfig,
                 grad_accum: int) -> None:
        super().__init__(trainer_side=trainer_side, opts=opts, grad_accum=grad_accum)
        self.gen = generator_side
        if trainer_side.trainer.ref_model is not None:
            generator_side.trainer.ref_model = trainer_side.trainer.ref_model  # read-only: one copy
        prepare_generator(generator_side, opts)
        trained = list(self.model.parameters())
        self.staging = [p.detach().clone() for p in trained]  # the published weights
        self.pairs = list(zip(trained, self.staging, self.gen.model.parameters()))
        self.gen_version = 0  # version in the generator's copy (self.published: in staging)
        self.next_index = 0  # the batch the generator makes next
        self.thread: threading.Thread | None = None

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
                self.cond.wait(POLL_S)
            if self.error is not None:
                raise self.error
            done = self.queue.pop(min(self.queue))  # in order: after a dropped batch, the next one
        return self.handed(done, waited_s=time.perf_counter() - waited, generator_idle=self.generator_clock.fraction())

    def publish(self, version: int) -> None:
        """Copy the stepped weights into the staging copy; the generator takes them between generations."""
        with self.cond, torch.no_grad():
            for trained, staged, _ in self.pairs:
                staged.copy_(trained)
            self.published = version
            self.cond.notify_all()

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
                done = generate(self.gen, self.next_index, self.gen_version)
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
        """Block until batch ``next_index`` may start; False: stop."""
        assert self.generator_clock is not None
        waited = time.perf_counter()
        go = self.may_start(self.next_index)
        self.generator_clock.waiting += time.perf_counter() - waited
        return go

    def _take_weights(self) -> None:
        with self.cond, torch.no_grad():
            if self.gen_version != self.published:
                for _, staged, copy in self.pairs:
                    copy.copy_(staged)
                self.gen_version = self.published

    # --- shutdown -------------------------------------------------------------------

    def close(self) -> None:
        """Stop the generator (after the generation under way) and join it."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
        self.gen.close()
        self.loss_side.close()
