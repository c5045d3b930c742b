"""The training loop. It owns steps, cadence and control; the backend owns the math.

    run_start                                    -> trainctl_run_start (then queued setup notices)
    for step in start .. max_steps - 1:
        lr = trainctl_lr(step) or optim.lr       -> trainctl_lr (first answer wins)
        out = backend.train_step(step)           # forward, backward, clip, update: no host sync
          or, for a rollout backend (trainctl.kernel.rollout):
            rollout = producer.next_rollout()    -> notice "rollout_waiting" while its workers are down
                                                    (control polled meanwhile: a stop ends the run here)
                                                 -> notice "stale_batch_dropped" per batch too old
                                                 -> trainctl_rollout_received
            out = backend.train_rollout(rollout) -> trainctl_weights_published (after the update)
        read out's fields if a logged step       # the one host sync of a logged step
        step_end                                 -> trainctl_step_end
        the first step after a resume            -> notice "recovery" (where the time since the last step went)
        evaluate every eval_interval (or epoch)  -> notice "evaluating", trainctl_eval_end (one per split)
        decision = combine(trainctl_control)     -> trainctl_control (any stop wins)
        decision = agree(decision)               # ranks: one MAX all-reduce of the flags
        evaluate if asked                        -> notice "evaluating", trainctl_eval_end
        save every save_interval (or epoch) or if asked -> notice "saving", trainctl_write_checkpoint, trainctl_checkpoint_saved
        while anyone answers pause: poll         -> trainctl_control (state "paused"); producer.hold(True)
        stop if anyone answered stop
    ending: final evaluation and checkpoint      -> trainctl_control (state "ending"), ...
    run_end, whatever happened                   -> trainctl_run_end
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from trainctl.hooks import notices
from trainctl.hooks.cadence import schedule
from trainctl.hooks.events import (
    CheckpointSaved,
    Control,
    EvalEnd,
    Notice,
    RolloutReceived,
    RunEnd,
    RunStart,
    StepEnd,
    WeightsPublished,
    combine,
)
from trainctl.hooks.plugin import RunInfo
from trainctl.kernel.backend import Backend, Distributed, Evaluation, Plan, StepOutput
from trainctl.kernel.bus import EventBus
from trainctl.kernel.distributed import Group
from trainctl.kernel.errors import PluginError
from trainctl.kernel.recovery import Recovery, restarts
from trainctl.kernel.rollout import RolloutBackend, Waiting
from trainctl.kernel.schema import TrainConfig
from trainctl.kernel.state import RunResult, RunState

PAUSE_POLL_S = 0.2


class Trainer:
    def __init__(
        self,
        *,
        backend: Backend,
        bus: EventBus,
        plan: Plan,
        train: TrainConfig,
        base_lr: float,
        run: RunInfo,
        state: RunState,
        write_state: Callable[[Path, RunState], None],
        resumed_from: str | None = None,
        group: Group | None = None,
        recovery: Recovery | None = None,
    ) -> None:
        self.backend, self.bus, self.plan, self.train = backend, bus, plan, train
        self.base_lr, self.run, self.state = base_lr, run, state
        self.write_state, self.resumed_from = write_state, resumed_from
        self.group = group or Group(Distributed())  # one process unless Run passes the ranks' group
        self.recovery = recovery  # a resumed run's start-up times, reported after its first step
        self.held = Control()  # decisions waiting for the next agreement (train.control_interval)
        # when to evaluate and save besides the end (train.eval_strategy / save_strategy): pure in the step
        self.eval_due = schedule(train.eval_strategy, train.eval_interval, plan.steps_per_epoch).due
        self.save_due = schedule(train.save_strategy, train.save_interval, plan.steps_per_epoch).due
        # a rollout backend's producer; None for a dataset backend, whose steps never touch the seam
        self.producer = backend.rollout_producer() if isinstance(backend, RolloutBackend) else None
        self.dropped = 0  # stale batches dropped in this process
        self.waiting = False  # a rollout_waiting notice was sent and no rollout came since
        peak = plan.peak_flops or train.peak_tflops * 1e12
        self.flops_share = (plan.flops_per_token or 0) / peak if peak else 0.0  # of the peak, per token per second

    def fit(self) -> RunResult:
        state, train, bus = self.state, self.train, self.bus
        status, reason = "completed", ""
        started = time.perf_counter()
        try:
            bus.run_start(RunStart(
                run_name=self.run.run_name, backend=self.run.backend, out_dir=str(self.run.out_dir),
                start_step=state.step, max_steps=train.max_steps, params=self.plan.params,
                tokens_per_step=self.plan.tokens_per_step, world_size=self.run.world_size, parallel=train.parallel,
                resumed_from=self.resumed_from, restarts=restarts(), time=time.time(),
            ))
            bus.deliver_pending()  # what setup queued: a skipped corrupt checkpoint, the metrics address
            if train.eval_at_start and state.step == 0:
                self._evaluate()
            decision = self._steps()
            if decision.stop:
                status = "failed" if decision.failed else "stopped"
                reason = decision.reason
            if status != "failed":
                self._ending(decision)
        except KeyboardInterrupt:
            status, reason = "stopped", "interrupted"
        except PluginError as exc:  # its message names the plugin and the hook
            status, reason = "failed", str(exc)
        except Exception as exc:  # the run ends as failed; run_end says why
            status, reason = "failed", self.group.explain(exc) or f"{type(exc).__name__}: {exc}"
        result = RunResult(
            status=status, step=state.step, tokens=state.tokens, train_loss=state.last_loss,
            val_loss=state.last_val_loss, reason=reason, out_dir=str(self.run.out_dir),
        )
        bus.deliver_pending()
        bus.run_end(RunEnd(
            status=status, step=state.step, tokens=state.tokens, duration=time.perf_counter() - started,
            train_loss=state.last_loss, val_loss=state.last_val_loss, reason=reason, time=time.time(),
        ))
        return result

    def _steps(self) -> Control:
        state, train, bus, backend = self.state, self.train, self.bus, self.backend
        interval = Interval()
        decision = Control()
        while state.step < train.max_steps:
            t0 = time.perf_counter()
            lr = bus.lr(state.step, self.base_lr)
            backend.set_lr(lr)
            out = backend.train_step(state.step) if self.producer is None else self._rollout_step()
            if isinstance(out, Control):  # stopped while the producer's workers were down
                return out
            state.step += 1
            bus.step = state.step
            state.tokens += out.tokens
            logged = state.step % train.log_interval == 0 or state.step == train.max_steps
            read = self._read(out) if logged else None  # the one host sync of a logged step
            step_time = time.perf_counter() - t0
            interval.add(step_time, out)
            if read is not None:
                state.last_loss = read.loss
            bus.step_end(self._step_event(lr, step_time, interval, read))
            if logged:
                interval = Interval()
            if self.recovery is not None:  # once: the first step after a resume
                self._recovered(self.recovery)
            bus.deliver_pending()

            if self.eval_due(state.step, train.max_steps):
                self._evaluate()
            decision = self._agree(bus.control(state.view(train.max_steps, "running")))
            bus.deliver_pending()  # e.g. a controller's acknowledgement, before acting on it
            self._act(decision, cadence_save=self.save_due(state.step, train.max_steps))
            while decision.pause and not decision.stop:
                decision = self._pause()
            if decision.stop:
                break
        return decision

    def _rollout_step(self) -> StepOutput | Control:
        """One step on a producer's batch: the policy version is the optimizer steps taken, a
        batch more than ``max_staleness`` versions behind it is dropped (and counted), and the
        new weights go to the producer once the optimizer has stepped. While the producer waits
        for unreachable workers, control is polled: a stop is returned, the step not run."""
        state, bus, producer = self.state, self.bus, self.producer
        assert producer is not None and isinstance(self.backend, RolloutBackend)
        version = state.step
        while True:
            rollout = producer.next_rollout(state.step, version)
            if isinstance(rollout, Waiting):
                decision = self._wait_for_workers(rollout)
                if decision.stop:
                    return decision
                continue
            staleness = version - rollout.policy_version
            if staleness <= producer.max_staleness:
                break
            self.dropped += 1
            bus.notice(Notice(step=state.step, kind=notices.STALE_BATCH_DROPPED, time=time.time(),
                              message=f"batch of policy {rollout.policy_version} is {staleness} versions behind",
                              data={"policy_version": rollout.policy_version, "staleness": staleness,
                                    "max_staleness": producer.max_staleness, "dropped": self.dropped}))
        self.waiting = False
        bus.rollout_received(RolloutReceived(
            step=state.step, policy_version=rollout.policy_version, staleness=staleness,
            completions=rollout.completions, tokens=rollout.tokens, generation_s=rollout.generation_s,
            reused=rollout.reused, stats=dict(rollout.stats), trainer_idle_fraction=rollout.trainer_idle_fraction,
            generator_idle_fraction=rollout.generator_idle_fraction, workers_up=rollout.workers_up, time=time.time(),
        ))
        out = self.backend.train_rollout(state.step, rollout)
        started = time.perf_counter()
        producer.publish(version + 1)
        bus.weights_published(WeightsPublished(step=state.step + 1, version=version + 1,
                                               duration=time.perf_counter() - started, time=time.time()))
        return out

    def _wait_for_workers(self, waiting: Waiting) -> Control:
        """One poll while the producer's workers are down: the notice once per outage (the next
        rollout event ends it), then control, as a pause polls it."""
        bus, state = self.bus, self.state
        if not self.waiting:
            self.waiting = True
            bus.notice(Notice(step=state.step, kind=notices.ROLLOUT_WAITING, time=time.time(), message=waiting.reason,
                              data={"workers_up": waiting.workers_up, "workers": waiting.workers}))
        bus.deliver_pending()
        decision = self._agree(bus.control(state.view(self.train.max_steps, "waiting")))
        self._act(decision)
        return decision

    def _step_event(self, lr: float, step_time: float, interval: Interval, read: Read | None) -> StepEnd:
        """A logged step (``read``) carries its outputs and the rates measured over the interval
        since the last logged step: tokens actually trained, and for MFU tokens processed."""
        measured = read is not None and interval.time > 0
        return StepEnd(
            step=self.state.step, max_steps=self.train.max_steps, lr=lr, tokens=self.state.tokens,
            step_time=step_time, mean_step_time=interval.time / interval.steps, logged=read is not None,
            loss=read.loss if read else None, grad_norm=read.grad_norm if read else None,
            skipped=read.skipped if read else False,
            skipped_updates=read.skipped_updates if read else None,
            skip_streak_max=read.skip_streak_max if read else None,
            tokens_per_s=interval.tokens / interval.time if measured else None,
            mfu=self.flops_share * interval.processed / interval.time if measured and self.flops_share else None,
            metrics=read.metrics if read else {}, time=time.time(),
        )

    def _recovered(self, recovery: Recovery) -> None:
        data = recovery.record(first_step=time.time())
        self.recovery = None
        self.bus.notice(Notice(step=self.state.step, kind=notices.RECOVERY, time=time.time(), data=data,
                               message=f"{data['total_s']:g} s from the last step before the fault to this one"))

    def _agree(self, decision: Control) -> Control:
        """All ranks act on the same decision at the same step: a stop, save, pause or eval
        decided on any rank (its signal, rank 0's ``trainctl ctl``, a loss guard) holds for all.
        With ``train.control_interval`` k > 1 the decisions of k steps are held and agreed on
        together (one collective per k steps); one process acts at once."""
        if not self.group.distributed:
            return decision
        step = self.state.step
        self.held = combine([self.held, decision])
        if step % self.train.control_interval and step < self.train.max_steps:
            return Control()
        decision, self.held = self.group.agree(self.held), Control()
        return decision

    def _act(self, decision: Control, *, cadence_save: bool = False) -> None:
        if decision.evaluate and self.state.evaluated_step != self.state.step:
            self._evaluate()
        if (decision.save or cadence_save) and not decision.stop:
            self._save(decision.reason if decision.save and decision.reason else "interval")

    def _pause(self) -> Control:
        """Keep the process and model alive; poll the plugins until nobody answers pause."""
        bus, state = self.bus, self.state
        bus.notice(Notice(step=state.step, kind=notices.PAUSED, message="training paused", time=time.time()))
        if self.producer is not None:
            self.producer.hold(True)  # a producer generating ahead stops too
        paused_at = time.perf_counter()
        while True:
            time.sleep(PAUSE_POLL_S)
            bus.deliver_pending()
            decision = self.group.agree(bus.control(state.view(self.train.max_steps, "paused")))
            self._act(decision)
            if not decision.pause or decision.stop:
                break
        if self.producer is not None:
            self.producer.hold(False)
        bus.notice(Notice(
            step=state.step, kind=notices.RESUMED, message="training resumed",
            data={"paused_s": round(time.perf_counter() - paused_at, 3)}, time=time.time(),
        ))
        return decision

    def _ending(self, decision: Control) -> None:
        """The last evaluation and checkpoint, for a run that completed or was stopped."""
        state, train = self.state, self.train
        final = self.group.agree(self.bus.control(state.view(train.max_steps, "ending")))
        completed = state.step >= train.max_steps and not decision.stop
        if (completed or final.evaluate) and state.evaluated_step != state.step:
            self._evaluate()
        if state.last_save_step != state.step:
            self._save(decision.reason if decision.stop and decision.reason else "end")

    def _evaluate(self) -> None:
        state = self.state
        # before the work, so that observers (status) can show it while it lasts
        self.bus.notice(Notice(step=state.step, kind=notices.EVALUATING, time=time.time()))
        started = time.perf_counter()
        results = {split: Evaluation.of(value) for split, value in self.backend.evaluate(state.step).items()}
        duration = time.perf_counter() - started
        state.evaluated_step = state.step
        if "val" in results:
            state.last_val_loss = results["val"].loss
            if state.best_val_loss is None or results["val"].loss < state.best_val_loss:
                state.best_val_loss = results["val"].loss
        for split, result in results.items():
            metrics = result.metrics | {name: value for name, value in (("perplexity", result.perplexity),
                                                                        ("accuracy", result.accuracy)) if value is not None}
            self.bus.eval_end(EvalEnd(step=state.step, split=split, loss=result.loss, loss_mean=result.loss_mean,
                                      duration=duration, metrics=metrics, time=time.time()))

    def _save(self, reason: str) -> None:
        state = self.state
        if not self.bus.can_write_checkpoints():
            return
        self.bus.notice(Notice(step=state.step, kind=notices.SAVING, message=reason, time=time.time()))
        started = time.perf_counter()
        path = self.bus.write_checkpoint(state.step, reason, lambda d: self.write_state(d, state))
        if path is None:
            return
        self.bus.deliver_pending()  # an asynchronous save this one waited for is announced first
        state.last_save_step = state.step
        self.bus.checkpoint_saved(CheckpointSaved(
            step=state.step, path=str(path), reason=reason, duration=time.perf_counter() - started,
            val_loss=state.last_val_loss if state.evaluated_step == state.step else None, time=time.time(),
        ))

    def _read(self, out: StepOutput) -> Read:
        fields = [("loss", out.loss), ("grad_norm", out.grad_norm), ("skipped", out.skipped),
                  ("skipped_updates", out.skipped_updates), ("skip_streak_max", out.skip_streak_max)]
        present = [(name, value) for name, value in fields if isinstance(value, torch.Tensor)]
        present += [(f"metrics.{name}", value) for name, value in out.metrics.items()]
        tensors = [value.detach().float().reshape(()) for _, value in present]
        # host sync: once per logged step, here only (with the mean over ranks, when distributed)
        values = dict(zip([name for name, _ in present], self.group.mean_(torch.stack(tensors)).tolist()))
        count = lambda name: int(values[name]) if name in values else None  # noqa: E731
        return Read(
            loss=values["loss"], grad_norm=values.get("grad_norm"),
            skipped=bool(values["skipped"]) if "skipped" in values else bool(out.skipped),
            skipped_updates=count("skipped_updates"), skip_streak_max=count("skip_streak_max"),
            metrics={name.removeprefix("metrics."): v for name, v in values.items() if name.startswith("metrics.")}
            | out.host_metrics,
        )


@dataclass(slots=True)
class Interval:
    """What happened since the last logged step: the rates of the next one."""

    steps: int = 0
    time: float = 0.0
    tokens: int = 0  # trained
    processed: int = 0  # run through the model (for MFU)

    def add(self, seconds: float, out: StepOutput) -> None:
        self.steps += 1
        self.time += seconds
        self.tokens += out.tokens
        self.processed += out.tokens if out.processed_tokens is None else out.processed_tokens


@dataclass(frozen=True, slots=True)
class Read:
    """A logged step's outputs on the host."""

    loss: float
    grad_norm: float | None
    skipped: bool
    skipped_updates: int | None
    skip_streak_max: int | None
    metrics: dict[str, float]
