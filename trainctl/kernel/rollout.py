"""The rollout seam: a step's batch may come from a *producer* (an actor generating from the
policy) instead of a dataset. The kernel owns the exchange, the backend owns its contents.

    version = completed optimizer steps           # the policy the trainer holds
    rollout = producer.next_rollout(step, version)
    while rollout is Waiting (its workers are down): notice "rollout_waiting" (once), poll control,
        stop -> the step is not run; rollout = producer.next_rollout(step, version)
    while version - rollout.policy_version > producer.max_staleness:
        notice "stale_batch_dropped"; rollout = producer.next_rollout(step, version)
    rollout_received                              -> trainctl_rollout_received
    out = backend.train_rollout(step, rollout)    # the update, as train_step does it
    producer.publish(version + 1)                 -> trainctl_weights_published
    paused: producer.hold(True) ... hold(False)   # generation ahead stops while paused

A backend opts in by answering ``rollout_producer()`` with a :class:`Producer`; one that has
no such method (every dataset backend) keeps the dataset path, and the loop spends nothing on
the seam. Only the producer knows how it generates (the policy itself in process, a worker
over loopback); the kernel sees versions, counts and seconds, plain host values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from trainctl.kernel.backend import StepOutput


@dataclass(frozen=True, kw_only=True, slots=True)
class Rollout:
    """One step's batch from a producer. ``batch`` is the backend's own (tensors, rows) and is
    never read by the kernel; the rest is what the events report."""

    batch: Any
    policy_version: int  # the optimizer steps the generating weights had taken
    completions: int  # sequences generated for it
    tokens: int  # completion tokens generated
    generation_s: float  # seconds the producer spent generating and scoring it
    reused: bool = False  # generated for an earlier step and trained on again (TRL's num_iterations)
    stats: dict[str, float] = field(default_factory=dict)  # host floats, e.g. the mean reward
    # an asynchronous producer's seconds waiting / wall since it started (None: synchronous)
    trainer_idle_fraction: float | None = None  # the trainer waiting for batches
    generator_idle_fraction: float | None = None  # the generator waiting for weights or a pause
    workers_up: int | None = None  # rollout workers answering (None: no workers, generation in process)


@dataclass(frozen=True, kw_only=True, slots=True)
class Waiting:
    """No batch yet and none under way: every worker that could make it is unreachable. The
    producer keeps retrying; the kernel polls control meanwhile, so a stop still saves."""

    reason: str  # one line for the status, e.g. "rollout worker 127.0.0.1:8600 unreachable"
    workers_up: int
    workers: int


@runtime_checkable
class Producer(Protocol):
    """Where a rollout backend's batches come from."""

    #: how many versions a batch may lag the trainer's policy; 0: synchronous (always current)
    max_staleness: int

    def next_rollout(self, step: int, version: int) -> Rollout | Waiting:
        """The batch to train ``step`` on, the trainer's policy being at ``version``. May block
        while generating; a synchronous producer generates from ``version`` itself. A producer
        whose generators are out of process answers :class:`Waiting` (after about half a second)
        while none of them can be reached, and is asked again."""

    def publish(self, version: int) -> None:
        """The optimizer has stepped: the trainer's weights are now ``version``. An in-process
        producer that generates with the policy itself has nothing to copy."""

    def hold(self, paused: bool) -> None:
        """The run is paused (True) or goes on (False): a producer generating ahead stops
        starting generations while paused; a synchronous one has nothing to do."""


@runtime_checkable
class RolloutBackend(Protocol):
    """What a backend adds to :class:`trainctl.kernel.backend.Backend` to train on rollouts."""

    def rollout_producer(self) -> Producer:
        """The producer of this run's batches, built by ``setup`` (called once, after it)."""

    def train_rollout(self, step: int, rollout: Rollout) -> StepOutput:
        """One optimizer step on ``rollout.batch``, with ``train_step``'s contract (no host sync
        beyond what the objective's metrics need, non-finite updates skipped)."""
