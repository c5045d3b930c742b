"""Event payloads and the values plugins hand back to the kernel.

Every payload is a frozen, slotted, keyword-only dataclass of plain Python values — never a
tensor — so that any observer can serialise it, keep it, or send it to another thread without
touching the device. ``to_record`` turns one into the flat dict written to ``events.jsonl``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

RunStatus = Literal["completed", "stopped", "failed"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RunStart:
    """The run is set up (model built, state restored) and about to take its first step."""

    run_name: str
    backend: str
    out_dir: str
    start_step: int  # > 0 when resumed
    max_steps: int
    params: int  # trainable parameters
    tokens_per_step: int  # global: all ranks, all micro-batches
    world_size: int = 1
    parallel: str = "ddp"  # how the model is placed over the ranks (train.parallel): ddp | fsdp
    resumed_from: str | None = None
    restarts: int = 0  # times a launcher started the run again (torchrun's and SLURM's restart counts)
    time: float  # time.time()


@dataclass(frozen=True, kw_only=True, slots=True)
class StepEnd:
    """One optimizer step finished (``step`` counts completed steps, so the first is 1).

    ``loss``, ``grad_norm``, the rates, the skip counters and ``metrics`` are only measured on
    logged steps (every ``train.log_interval``): reading a device value is a host sync, and the
    kernel does exactly one per logged step. On other steps they are ``None``/empty and
    ``logged`` is False. ``step_time`` is this step's own wall time; on a GPU the work of
    unlogged steps is queued asynchronously and lands in the next logged step's time, so rates
    use ``mean_step_time`` (and ``tokens_per_s`` the tokens actually trained over that interval).
    """

    step: int
    max_steps: int
    lr: float
    tokens: int  # cumulative trained tokens, all ranks
    step_time: float  # seconds: this step alone (the backend's step and the kernel's read)
    mean_step_time: float = 0.0  # seconds: mean over the steps since the last logged step
    logged: bool
    loss: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None  # measured: tokens trained since the last logged step / their time
    mfu: float | None = None
    skipped: bool = False  # the update was not applied (e.g. non-finite loss)
    skipped_updates: int | None = None  # updates skipped since the process started (None: not counted)
    skip_streak_max: int | None = None  # the longest run of consecutive skipped updates
    metrics: dict[str, float] = field(default_factory=dict)  # loss terms and backend extras
    time: float


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalEnd:
    """One split was evaluated. ``source`` is ``local`` (in the loop) or ``remote`` (a worker).
    ``loss_mean`` says which number ``loss`` is (``train.eval_loss``): ``tokens`` the mean over
    every scored token, ``batches`` transformers' ``Trainer.evaluate()`` ``eval_loss`` (each
    batch's mean, weighted by its rows)."""

    step: int
    split: str  # train | val; a gpt mixture adds val.NAME, each source's own val
    loss: float
    loss_mean: str = "tokens"  # tokens | batches
    source: str = "local"
    duration: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    time: float


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointSaved:
    """A complete checkpoint now exists at ``path``."""

    step: int
    path: str
    reason: str  # interval | best | end | signal | request | ...
    duration: float
    val_loss: float | None = None
    time: float


@dataclass(frozen=True, kw_only=True, slots=True)
class RunEnd:
    """The run is over; nothing fires after this."""

    status: RunStatus
    step: int
    tokens: int
    duration: float
    train_loss: float | None = None
    val_loss: float | None = None
    reason: str = ""  # why it stopped or failed, one line
    time: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Notice:
    """Something worth recording that is not one of the lifecycle events: a control command
    acknowledged, a loss spike, generated samples, a plugin disabled. ``kind`` names it: one of
    the declared kinds of :mod:`trainctl.hooks.notices` (or of a plugin's ``PluginSpec.notices``),
    which also says what ``data`` holds for it; the bus refuses any other."""

    step: int
    kind: str  # a declared kind: use the constants of trainctl.hooks.notices
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # plain JSON values only
    time: float


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutReceived:
    """A producer handed the kernel the batch of the step about to run (rollout backends only,
    ``trainctl.kernel.rollout``). ``staleness`` is how many optimizer steps the generating
    weights lag the policy being trained (0 when synchronous)."""

    step: int  # completed steps: the batch trains step + 1
    policy_version: int  # the optimizer steps the generating weights had taken
    staleness: int
    completions: int  # sequences generated
    tokens: int  # completion tokens generated
    generation_s: float  # seconds spent generating and scoring
    reused: bool = False  # an earlier step's generation trained on again (TRL's num_iterations)
    stats: dict[str, float] = field(default_factory=dict)  # the producer's, e.g. reward mean
    # an asynchronous producer's (None when synchronous): seconds waiting / wall since it started
    trainer_idle_fraction: float | None = None  # the trainer waiting for a batch
    generator_idle_fraction: float | None = None  # the generator waiting for weights or a pause
    workers_up: int | None = None  # rollout workers answering (None: generation in process)
    time: float


@dataclass(frozen=True, kw_only=True, slots=True)
class WeightsPublished:
    """The optimizer stepped and the producer was given the new weights (``version``: the
    optimizer steps they have taken; an in-process producer generates with them directly)."""

    step: int
    version: int
    duration: float  # seconds the producer took to take them
    time: float


Event = RunStart | StepEnd | EvalEnd | CheckpointSaved | RunEnd | Notice | RolloutReceived | WeightsPublished

#: The ``"event"`` field of each payload in ``events.jsonl``.
EVENT_NAMES: dict[type, str] = {
    RunStart: "run_start",
    StepEnd: "step",
    EvalEnd: "eval",
    CheckpointSaved: "save",
    RunEnd: "run_end",
    Notice: "notice",
    RolloutReceived: "rollout",
    WeightsPublished: "weights_published",
}


def to_record(event: Event) -> dict[str, Any]:
    """The flat JSON-ready dict of an event, with ``"event"`` first."""
    record: dict[str, Any] = {"event": EVENT_NAMES[type(event)]}
    for f in dataclasses.fields(event):
        record[f.name] = getattr(event, f.name)
    if isinstance(event, RunStart):
        record["step"] = event.start_step
    return record


# --- what plugins hand back ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class RunView:
    """What a plugin may look at when it decides. A snapshot, not the kernel's state."""

    step: int  # completed steps
    max_steps: int
    state: str  # running | paused | waiting (for rollout workers) | ending
    last_loss: float | None
    last_val_loss: float | None
    evaluated: bool  # an evaluation ran at this step already
    time: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Control:
    """A plugin's decision. The kernel combines all of them: any ``stop`` wins, ``save`` and
    ``evaluate`` happen if anyone asks, and the run stays paused while anyone answers ``pause``
    (so a pause is level-triggered: stop answering ``pause`` to resume). ``reason`` names why,
    for the event log and the checkpoint ledger (``signal``, ``request``, ``best``, ...)."""

    stop: bool = False
    save: bool = False
    evaluate: bool = False
    pause: bool = False
    failed: bool = False  # with stop: end the run as failed (e.g. the loss guard gave up)
    reason: str = ""


CONTINUE = Control()


def combine(decisions: list[Control]) -> Control:
    """Merge decisions so that the result does not depend on plugin order."""
    if not decisions:
        return CONTINUE
    stop = [d for d in decisions if d.stop]
    save = [d for d in decisions if d.save]
    reasons = [d.reason for d in stop or save or decisions if d.reason]
    return Control(
        stop=bool(stop),
        save=bool(save),
        evaluate=any(d.evaluate for d in decisions),
        pause=any(d.pause for d in decisions) and not stop,
        failed=any(d.failed for d in stop),
        reason=", ".join(sorted(set(reasons))),
    )
