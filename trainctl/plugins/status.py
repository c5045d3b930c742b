"""``OUT/status.json``: what the run is doing now, for ``trainctl status``, scripts and dashboards.

Rewritten atomically (a temporary file created exclusively, then ``os.replace``: never written
through a symlink) on every change of state, and with the step's numbers at most once per
``interval`` seconds, so a reader never sees half a file and a fast run does not spend its time
writing it. Fields::

    state       starting | running | paused | evaluating | saving | waiting | completed | stopped | failed
    step, max_steps, loss, val_loss, tokens_per_s, eta_s, last_checkpoint {path, step, reason},
    pid, host, started, updated (unix times), error (on failure), reason (why it stopped),
    metrics_address (when a metrics endpoint announced itself), resumed_from, run_name, out_dir,
    restarts (by torchrun / SLURM), recovery (the ``recovery`` notice's phases after a resume),
    rollout (rollout backends only: policy_version, staleness and generation_s of the last
    batch trained, stale batches dropped so far, staleness_counts (batches trained by staleness),
    trainer_idle_fraction and generator_idle_fraction (asynchronous producers, else None),
    workers_up (rollout workers answering, else None) and waiting (why no batch can come while
    every rollout worker is unreachable: state is ``waiting`` then, else None); None for a dataset run)

``starting`` lasts from run start to the first finished step (compilation, a first evaluation).
A run that dies without reaching ``run_end`` (kill -9, power loss) leaves its last state with a
pid that no longer exists: ``trainctl status`` says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from trainctl.control.files import hostname, write_json
from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import CheckpointSaved, EvalEnd, Notice, RolloutReceived, RunEnd, RunStart, RunView, StepEnd

FILE = "status.json"
TRANSIENT = {notices.EVALUATING: "evaluating", notices.SAVING: "saving"}  # notice kind -> state


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    interval: float = 1.0  # seconds between rewrites for step progress (state changes: at once)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("interval must be positive")


class Status:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.interval = config.interval
        self.path = run.out_dir / FILE
        self.enabled = run.is_main
        self.base = "starting"  # running or paused: where a transient state returns to
        self.step_time: float | None = None
        self.last_write = 0.0
        self.doc: dict[str, Any] = {
            "state": "starting", "run_name": run.run_name, "backend": run.backend, "out_dir": str(run.out_dir),
            "step": 0, "max_steps": run.max_steps, "loss": None, "val_loss": None, "tokens_per_s": None,
            "eta_s": None, "last_checkpoint": None, "pid": os.getpid(), "host": hostname(),
            "started": time.time(), "updated": None, "error": None, "reason": None,
            "metrics_address": None, "resumed_from": None, "restarts": 0, "recovery": None,
            "rollout": None,
        }

    def write(self, **changes: Any) -> None:
        self.doc.update(changes)
        if not self.enabled:
            return
        self.doc["updated"] = time.time()
        write_json(self.path, self.doc)
        self.last_write = time.monotonic()

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        self.write(step=event.start_step, max_steps=event.max_steps, resumed_from=event.resumed_from, started=event.time,
                   restarts=event.restarts)

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        self.doc["step"] = event.step
        if self.base == "starting":
            self.base = self.doc["state"] = "running"
            self.last_write = 0.0  # show "running" at once
        if event.logged:
            self.step_time = event.mean_step_time or event.step_time
            self.doc.update(loss=event.loss, tokens_per_s=event.tokens_per_s)
        if self.step_time is not None:
            self.doc["eta_s"] = round((event.max_steps - event.step) * self.step_time, 1)
        if time.monotonic() - self.last_write >= self.interval:  # a fast run logs hundreds of steps a second
            self.write()

    @hookimpl
    def trainctl_notice(self, event: Notice) -> None:
        if event.kind in TRANSIENT:
            self.write(state=TRANSIENT[event.kind], step=event.step)
        elif event.kind in (notices.PAUSED, notices.RESUMED):
            self.base = "paused" if event.kind == notices.PAUSED else "running"
            self.write(state=self.base)
        elif event.kind == notices.RECOVERY:
            self.write(recovery=dict(event.data))
        elif event.kind == notices.ROLLOUT_WAITING:
            self.rollout().update(waiting=event.message, workers_up=event.data["workers_up"])
            self.write(state="waiting")
        elif event.kind == notices.STALE_BATCH_DROPPED:
            self.rollout()["dropped"] = event.data["dropped"]  # written with the next step's numbers
        elif event.kind == notices.METRICS and event.data.get("address"):
            self.write(metrics_address=event.data["address"])

    def rollout(self) -> dict[str, Any]:
        if self.doc["rollout"] is None:
            self.doc["rollout"] = {"policy_version": None, "staleness": None, "generation_s": None, "dropped": 0,
                                   "staleness_counts": {}, "trainer_idle_fraction": None,
                                   "generator_idle_fraction": None, "workers_up": None, "waiting": None}
        return self.doc["rollout"]

    @hookimpl
    def trainctl_rollout_received(self, event: RolloutReceived) -> None:
        rollout = self.rollout()
        was_waiting = rollout["waiting"] is not None
        counts = rollout["staleness_counts"]
        counts[str(event.staleness)] = counts.get(str(event.staleness), 0) + 1  # JSON keys are strings
        idle = lambda value: None if value is None else round(value, 4)  # noqa: E731
        rollout.update(policy_version=event.policy_version, staleness=event.staleness,
                       generation_s=round(event.generation_s, 4), trainer_idle_fraction=idle(event.trainer_idle_fraction),
                       generator_idle_fraction=idle(event.generator_idle_fraction), workers_up=event.workers_up,
                       waiting=None)
        if was_waiting:
            self.write(state=self.base)

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        if event.split == "val" and event.source == "local":
            self.doc["val_loss"] = event.loss
        self.write(state=self.base)

    @hookimpl
    def trainctl_checkpoint_saved(self, event: CheckpointSaved) -> None:
        self.write(state=self.base, last_checkpoint={"path": event.path, "step": event.step, "reason": event.reason})

    @hookimpl
    def trainctl_control(self, view: RunView) -> None:
        # while paused the kernel polls every ~0.2 s: keep "updated" fresh, at the usual rate
        if view.state == "paused" and time.monotonic() - self.last_write >= self.interval:
            self.write()

    @hookimpl
    def trainctl_run_end(self, event: RunEnd) -> None:
        self.write(
            state=event.status, step=event.step, eta_s=0.0 if event.status == "completed" else None,
            loss=event.train_loss if event.train_loss is not None else self.doc["loss"],
            val_loss=event.val_loss if event.val_loss is not None else self.doc["val_loss"],
            error=event.reason if event.status == "failed" else None, reason=event.reason or None,
        )


SPEC = PluginSpec(name="status", factory=Status, config=Config,
                  description="OUT/status.json, rewritten atomically: state, step, losses, speed, ETA, last checkpoint, pid.")
