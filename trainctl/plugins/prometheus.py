"""Live Prometheus metrics at ``http://127.0.0.1:9464/metrics``, served by a daemon thread so that
``/metrics`` keeps answering during evaluation, saving and pauses.

Every series carries the labels ``run``, ``backend`` and ``rank`` and nothing unbounded (never a
step or a path)::

    trainctl_step                              gauge      completed steps
    trainctl_max_steps                         gauge
    trainctl_tokens_total                      counter    tokens trained by the run, all ranks (since step 0)
    trainctl_train_loss                        gauge      measured on logged steps
    trainctl_eval_loss{split,source,mean}      gauge      source: local | remote; mean: tokens | batches
    trainctl_learning_rate                     gauge
    trainctl_grad_norm                         gauge      logged steps, before clipping
    trainctl_tokens_per_second                 gauge      logged steps
    trainctl_mfu_ratio                         gauge      logged steps, when the peak is known
    trainctl_step_duration_seconds             histogram  every step's own duration
    trainctl_checkpoints_saved_total           counter
    trainctl_checkpoint_save_duration_seconds  gauge      the last save
    trainctl_skipped_steps_total               counter    updates not applied (seen on logged steps)
    trainctl_run_state{state}                  gauge      1 for the current state (running, evaluating,
                                                         saving, paused, completed, stopped, failed)
    trainctl_run_info{version,world_size}      gauge      always 1
    trainctl_restarts_total                    counter    times torchrun / SLURM started the run again
    trainctl_recovery_seconds{phase}           gauge      the last resume: last step -> first step, by phase
    trainctl_last_step_timestamp_seconds       gauge      the run start until a step completes
    trainctl_layer_{weight,grad}_norm{layer}   gauge      from the layer_stats plugin
    trainctl_last_success_timestamp_seconds    gauge      set when the run completes (Pushgateway)
    trainctl_step_metric{name}                 gauge      every entry of a logged step's ``metrics``
    trainctl_eval_metric{split,source,name}    gauge      every entry of an evaluation's ``metrics``

The last two export whatever a backend or objective measures (loss terms, token accuracy, DPO's
``rewards/accuracies``...) with no code here that knows the names: the name is a label value,
kept as the backend spells it (``/`` included, so PromQL reads ``name="rewards/margins"``), other
characters outside ``[A-Za-z0-9_./-]`` replaced by ``_`` and cut at 100 characters. At most
``max_metric_names`` distinct names are exported (a warning once, then the rest are dropped), so a
backend that puts a step number in a name cannot grow the series without bound.

The step-duration histogram observes every step's own ``step_time`` (evaluation, saving and
pauses excluded), carried by every step event.

Under several processes only local rank 0 serves (one endpoint per node, ``rank`` labelled) unless
``per_rank_ports`` gives every local rank ``port + local_rank``. A busy port is a warning, never
a failure: training goes on without the endpoint. The endpoint (:mod:`.metrics_server`) serves
every connection from one thread without blocking: a client has ``request_timeout`` seconds in
total to send its request and read the answer, and at most ``max_connections`` are open, so a
slow or hostile client never keeps a scrape waiting.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from trainctl import __version__
from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import CheckpointSaved, EvalEnd, Notice, RolloutReceived, RunEnd, RunStart, StepEnd, WeightsPublished

LABELS = ("run", "backend", "rank")
STATES = ("running", "evaluating", "saving", "paused", "completed", "stopped", "failed")
# notices that announce a state (a kernel that announces evaluating/saving before the work);
# the next step, evaluation result or checkpoint means running again
STATE_NOTICES = {notices.PAUSED: "paused", notices.RESUMED: "running", notices.EVALUATING: "evaluating", notices.SAVING: "saving"}
# 1 ms (tiny CPU models) to a minute (large models): wide enough that p50/p95 stay resolvable
STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
LAYER_STATS = ("weight_norm", "grad_norm")
NAME_CHARS = re.compile(r"[^A-Za-z0-9_./-]")


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    address: str = "127.0.0.1"  # 0.0.0.0 exposes the metrics to the network
    port: int = 9464  # 0 = any free port (the address chosen is reported in a "metrics" notice)
    per_rank_ports: bool = False  # every local rank serves on port + local_rank
    pushgateway: str = ""  # e.g. "http://127.0.0.1:9091": push the final metrics at run end
    job: str = "trainctl"  # the Pushgateway job
    step_buckets: list[float] = field(default_factory=lambda: list(STEP_BUCKETS))
    max_metric_names: int = 64  # distinct step/eval metric names exported; more are dropped with a warning
    request_timeout: float = 5.0  # seconds from connecting for a client to send its request and read the answer, in total
    max_connections: int = 32  # open at once; past that the oldest still sending its request is closed

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 (any free port) and 65535")
        if self.pushgateway and not self.pushgateway.startswith(("http://", "https://")):
            raise ValueError("pushgateway must be an http:// or https:// URL, or empty")
        if not self.step_buckets or sorted(self.step_buckets) != list(self.step_buckets):
            raise ValueError("step_buckets must be a non-empty increasing list of seconds")
        if self.max_metric_names < 0:
            raise ValueError("max_metric_names must be 0 (export none) or more")
        if not self.request_timeout > 0:
            raise ValueError("request_timeout must be more than 0 seconds")
        if self.max_connections < 1:
            raise ValueError("max_connections must be 1 or more")


class Metrics:
    """The run's metrics in their own registry: never the process-global one, so two runs (or a
    test and a run) in one process do not collide."""

    def __init__(self, buckets: list[float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, *extra: str) -> Any:
            return Gauge(f"trainctl_{name}", doc, [*LABELS, *extra], registry=r)

        self.step = gauge("step", "Completed optimizer steps.")
        self.max_steps = gauge("max_steps", "Steps the run is configured to train.")
        self.tokens = Counter("trainctl_tokens", "Tokens trained by the run, all ranks.", LABELS, registry=r)
        self.train_loss = gauge("train_loss", "Training loss of the last logged step.")
        self.eval_loss = gauge("eval_loss", "Evaluation loss by split and source (local or remote); mean says which "
                               "number it is (tokens: over every token, batches: Trainer's eval_loss).",
                               "split", "source", "mean")
        self.lr = gauge("learning_rate", "Learning rate of the last step.")
        self.grad_norm = gauge("grad_norm", "Gradient norm before clipping, last logged step.")
        self.tokens_per_s = gauge("tokens_per_second", "Training throughput over the last logging interval.")
        self.mfu = gauge("mfu_ratio", "Model FLOPs utilisation over the last logging interval (0-1).")
        self.step_duration = Histogram(
            "trainctl_step_duration_seconds", "Duration of each optimizer step (no eval, save or pause).",
            LABELS, buckets=buckets, registry=r,
        )
        self.saves = Counter("trainctl_checkpoints_saved", "Checkpoints written.", LABELS, registry=r)
        self.save_duration = gauge("checkpoint_save_duration_seconds", "Duration of the last checkpoint save.")
        self.skipped = Counter("trainctl_skipped_steps", "Updates not applied (non-finite loss or gradient), seen on logged steps.", LABELS, registry=r)
        self.state = gauge("run_state", "1 for the run's current state, 0 for the others.", "state")
        self.info = gauge("run_info", "Facts about the run; always 1.", "version", "world_size")
        self.restarts = Counter("trainctl_restarts", "Times a launcher started the run again (torchrun's "
                                "TORCHELASTIC_RESTART_COUNT + SLURM_RESTART_COUNT).", LABELS, registry=r)
        self.recovery = gauge("recovery_seconds", "The last resume: seconds from the last step before the fault to "
                              "the first step after it, by phase (total is their sum).", "phase")
        self.last_step = gauge("last_step_timestamp_seconds", "Unix time of the last completed step (the run start before the first).")
        self.layer = {stat: gauge(f"layer_{stat}", f"Per-layer {stat.replace('_', ' ')} (layer_stats plugin).", "layer") for stat in LAYER_STATS}
        self.last_success = gauge("last_success_timestamp_seconds", "Unix time the run last completed.")
        self.step_metric = gauge("step_metric", "A backend's step metric by name, last logged step.", "name")
        self.eval_metric = gauge("eval_metric", "A backend's evaluation metric by split, source and name.",
                                 "split", "source", "name")


class RolloutMetrics:
    """A rollout backend's metrics (``trainctl.kernel.rollout``), bound to the run's labels and
    added to its registry at the first rollout event: a dataset run exports none of them."""

    def __init__(self, registry: Any, labels: dict[str, str]) -> None:
        from prometheus_client import Counter, Gauge

        def metric(kind: type, name: str, doc: str) -> Any:
            return kind(f"trainctl_{name}", doc, LABELS, registry=registry).labels(**labels)

        self.policy_version = metric(Gauge, "policy_version", "Optimizer steps of the weights last published to the producer.")
        self.staleness = metric(Gauge, "rollout_staleness", "Versions the last trained rollout lagged the policy (0: synchronous).")
        self.completions = metric(Counter, "rollout_completions", "Completions generated for trained rollouts.")
        self.tokens = metric(Counter, "rollout_tokens", "Completion tokens generated for trained rollouts.")
        self.generation = metric(Counter, "rollout_generation_seconds", "Seconds producers spent generating and scoring.")
        self.stale = metric(Counter, "stale_batches_dropped", "Rollouts dropped for lagging the policy by more than max_staleness.")
        self.trainer_idle = metric(Gauge, "rollout_trainer_idle_fraction",
                                   "Seconds the trainer waited for rollouts / wall (asynchronous producers).")
        self.generator_idle = metric(Gauge, "rollout_generator_idle_fraction",
                                     "Seconds the generator waited for weights or a pause / wall (asynchronous producers).")
        self.workers_up = metric(Gauge, "rollout_workers_up", "Rollout workers answering (hf.grpo.rollout_workers).")
        # staleness is a small integer (0..max_staleness): a counter by value is the exact histogram
        self.by_staleness = Counter("trainctl_rollout_staleness_batches", "Rollouts trained, by staleness in versions.",
                                    [*LABELS, "staleness"], registry=registry)
        self.labels = labels


class PrometheusExporter:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config, self.run = config, run
        self.metrics = m = Metrics(list(config.step_buckets))
        self.registry = m.registry
        labels = {"run": run.run_name, "backend": run.backend, "rank": str(run.rank)}
        self.labels = labels
        # children bound once: the per-step path is a few attribute sets, no label lookups
        self.step, self.lr = m.step.labels(**labels), m.lr.labels(**labels)
        self.step_duration = m.step_duration.labels(**labels)
        self.last_step = m.last_step.labels(**labels)
        self.tokens = m.tokens.labels(**labels)
        m.saves.labels(**labels)  # a true zero from the start
        m.skipped.labels(**labels)
        m.info.labels(**labels, version=__version__, world_size=str(run.world_size)).set(1)
        self.tokens_seen = 0
        self.server: Any = None  # a MetricsServer while serving
        self.state = ""
        self.address: str | None = None
        self.names: dict[str, str] = {}  # an exported metric's name -> its label value
        self.taken: set[str] = set()  # label values in use, at most max_metric_names
        self.capped = False  # the warning about the cap was given
        self.step_metrics: dict[str, Any] = {}  # label value -> bound child
        self.rollouts: RolloutMetrics | None = None  # at the first rollout event

    def rollout_metrics(self) -> RolloutMetrics:
        if self.rollouts is None:
            self.rollouts = RolloutMetrics(self.registry, self.labels)
        return self.rollouts

    # --- serving ---------------------------------------------------------------------------

    def port(self) -> int:
        c = self.config
        return c.port + self.run.local_rank if c.per_rank_ports and c.port else c.port

    def serve(self, step: int) -> None:
        from trainctl.plugins.metrics_server import MetricsServer

        c = self.config
        try:
            self.server = MetricsServer(c.address, self.port(), self.registry, timeout=c.request_timeout,
                                        max_connections=c.max_connections)
        except OSError as exc:
            problem = (
                f"prometheus: cannot serve metrics on {c.address}:{self.port()} ({exc.strerror or exc}); "
                "training goes on without them. Set plugin.prometheus.port (0 picks a free one)"
            )
            print(f"trainctl: warning: {problem}", file=sys.stderr)
            self.run.emit(Notice(step=step, kind=notices.METRICS_UNAVAILABLE, message=problem,
                                 data={"error": str(exc)}, time=time.time()))
            return
        host, port = self.server.address
        host = f"[{host}]" if ":" in host else host
        self.address = f"http://{host}:{port}/metrics"
        self.run.emit(Notice(step=step, kind=notices.METRICS, message=f"serving {self.address}",
                             data={"address": self.address}, time=time.time()))

    def set_state(self, state: str) -> None:
        self.state = state
        for s in STATES:
            self.metrics.state.labels(**self.labels, state=s).set(1 if s == state else 0)

    # --- events ----------------------------------------------------------------------------

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        self.step.set(event.start_step)
        self.metrics.max_steps.labels(**self.labels).set(event.max_steps)
        self.metrics.restarts.labels(**self.labels).inc(event.restarts)  # a true zero on a first start
        self.last_step.set(event.time)  # so a trainer stuck before its first step still alerts
        self.set_state("running")
        self.serve(event.start_step)

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        if self.state != "running":
            self.set_state("running")
        self.lr.set(event.lr)
        self.tokens.inc(event.tokens - self.tokens_seen)
        self.tokens_seen = event.tokens
        self.step_duration.observe(event.step_time)  # this step's own duration
        # the step last: a scrape racing this hook never sees a step whose tokens are not counted
        self.step.set(event.step)
        self.last_step.set(event.time)
        if not event.logged:
            return
        m, labels = self.metrics, self.labels
        if event.loss is not None:
            m.train_loss.labels(**labels).set(event.loss)
        if event.grad_norm is not None:
            m.grad_norm.labels(**labels).set(event.grad_norm)
        if event.tokens_per_s is not None:
            m.tokens_per_s.labels(**labels).set(event.tokens_per_s)
        if event.mfu is not None:
            m.mfu.labels(**labels).set(event.mfu)
        if event.skipped:
            m.skipped.labels(**labels).inc()
        for name, value in event.metrics.items():
            if (label := self.label(name)) is not None:
                if label not in self.step_metrics:
                    self.step_metrics[label] = m.step_metric.labels(**labels, name=label)
                self.step_metrics[label].set(value)

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        if self.state == "evaluating":
            self.set_state("running")
        self.metrics.eval_loss.labels(**self.labels, split=event.split, source=event.source, mean=event.loss_mean).set(event.loss)
        for name, value in event.metrics.items():
            if (label := self.label(name)) is not None:
                self.metrics.eval_metric.labels(**self.labels, split=event.split, source=event.source,
                                                name=label).set(value)

    def label(self, name: str) -> str | None:
        """The ``name`` label for a metric, or None once ``max_metric_names`` labels are taken (a
        warning the first time). Only exported names are remembered, so memory stays bounded too."""
        if (label := self.names.get(name)) is not None:
            return label
        label = NAME_CHARS.sub("_", name)[:100] or "_"
        if label not in self.taken:
            if len(self.taken) >= self.config.max_metric_names:
                if not self.capped:
                    self.capped = True
                    print(f"trainctl: warning: prometheus: more than {self.config.max_metric_names} distinct "
                          f"step/eval metric names; {name!r} and any later new names are not exported. Raise "
                          "plugin.prometheus.max_metric_names if they are all wanted", file=sys.stderr)
                return None
            self.taken.add(label)
        self.names[name] = label
        return label

    @hookimpl
    def trainctl_checkpoint_saved(self, event: CheckpointSaved) -> None:
        if self.state == "saving":
            self.set_state("running")
        self.metrics.saves.labels(**self.labels).inc()
        self.metrics.save_duration.labels(**self.labels).set(event.duration)

    @hookimpl
    def trainctl_notice(self, event: Notice) -> None:
        if event.kind in STATE_NOTICES:
            self.set_state(STATE_NOTICES[event.kind])
        elif event.kind == notices.RECOVERY:
            for name, value in event.data.items():
                if name.endswith("_s"):
                    self.metrics.recovery.labels(**self.labels, phase=name.removesuffix("_s")).set(value)
        elif event.kind == notices.STALE_BATCH_DROPPED:
            self.rollout_metrics().stale.inc()
        elif event.kind == notices.ROLLOUT_WAITING:
            self.rollout_metrics().workers_up.set(event.data["workers_up"])
        elif event.kind == notices.LAYER_STATS:
            for name, value in event.data.items():
                layer, _, stat = name.rpartition(".")
                if stat in LAYER_STATS and layer:  # layer names are bounded by the model's depth
                    self.metrics.layer[stat].labels(**self.labels, layer=layer).set(value)

    @hookimpl
    def trainctl_rollout_received(self, event: RolloutReceived) -> None:
        m = self.rollout_metrics()
        m.staleness.set(event.staleness)
        m.by_staleness.labels(**m.labels, staleness=str(event.staleness)).inc()
        if event.trainer_idle_fraction is not None:
            m.trainer_idle.set(event.trainer_idle_fraction)
        if event.generator_idle_fraction is not None:
            m.generator_idle.set(event.generator_idle_fraction)
        if event.workers_up is not None:
            m.workers_up.set(event.workers_up)
        if not event.reused:  # a generation trained on again was counted when it was made
            m.completions.inc(event.completions)
            m.tokens.inc(event.tokens)
            m.generation.inc(event.generation_s)

    @hookimpl
    def trainctl_weights_published(self, event: WeightsPublished) -> None:
        self.rollout_metrics().policy_version.set(event.version)

    @hookimpl
    def trainctl_run_end(self, event: RunEnd) -> None:
        self.step.set(event.step)
        self.set_state(event.status)
        if event.status == "completed":
            self.metrics.last_success.labels(**self.labels).set(event.time)
        if self.config.pushgateway:
            self.push()
        if self.server is not None:
            self.server.close()
            self.server = None

    def push(self) -> None:
        """``pushadd`` (POST): replaces only this run's metrics in the group, so the last-success
        timestamp of an earlier completed run survives a failed one."""
        from prometheus_client import pushadd_to_gateway

        key = {"run": self.run.run_name, "rank": str(self.run.rank)}
        try:
            pushadd_to_gateway(self.config.pushgateway, job=self.config.job, registry=self.registry,
                               grouping_key=key, timeout=10)
        except Exception as exc:  # an unreachable gateway must not turn a finished run into a failure
            print(f"trainctl: warning: prometheus: push to {self.config.pushgateway} failed: {exc}", file=sys.stderr)


class NotServing:
    """What a rank that neither serves nor pushes gets: no hooks, so no per-step cost."""


def make(config: Config, run: RunInfo) -> PrometheusExporter | NotServing:
    if run.local_rank == 0 or config.per_rank_ports:
        return PrometheusExporter(config, run)
    return NotServing()


SPEC = PluginSpec(name="prometheus", factory=make, config=Config,
                  description="Live Prometheus metrics on 127.0.0.1:9464/metrics (per-rank ports optional), Pushgateway at the end.")
