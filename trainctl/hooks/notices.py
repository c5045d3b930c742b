"""The notice vocabulary: every ``Notice.kind`` that may be sent, who sends it, what it carries.

Plugins match notices by kind (``if event.kind == notices.SAVING``), so the kinds are a closed
vocabulary, declared here for the kernel and the built-in plugins and by a third-party plugin in
its own ``PluginSpec(notices=(NoticeKind(...), ...))``. The bus refuses a notice whose kind no
one declared, at ``run.emit`` / delivery time, with one line naming the kind and how to declare
it; ``tests/test_notices.py`` fails when the code spells a kind that is not declared here.

Use the constants below, never the strings: a typo is then an ``ImportError`` or a ``NameError``
rather than a notice nobody hears.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, kw_only=True, slots=True)
class NoticeKind:
    """One kind of notice: its ``name`` (the ``Notice.kind`` string), who sends it (``kernel``,
    ``bus`` or a plugin's name), when, and what ``Notice.data`` holds, key by key (``"*"`` for
    keys that vary, e.g. one per layer)."""

    name: str
    sender: str
    when: str
    data: Mapping[str, str] = field(default_factory=dict)


class UndeclaredNotice(ValueError):
    """A notice whose kind no one declared: a bug in the plugin that sent it."""


_BUILTIN: dict[str, NoticeKind] = {}


def _kind(name: str, sender: str, when: str, **data: str) -> str:
    _BUILTIN[name] = NoticeKind(name=name, sender=sender, when=when, data=data)
    return name


# --- the kernel and the bus -------------------------------------------------------------------

EVALUATING = _kind("evaluating", "kernel", "just before an evaluation starts, so observers can show the pause")
SAVING = _kind("saving", "kernel", "just before a checkpoint is written; message is the reason")
PAUSED = _kind("paused", "kernel", "the run paused (a plugin answered pause)")
RESUMED = _kind("resumed", "kernel", "the run resumed after a pause", paused_s="float: seconds paused")
PLUGIN_ERROR = _kind("plugin_error", "bus", "an observer plugin raised in a hook; message says where and why",
                     plugin="str: the plugin's name", failures="int: its failures so far")
PLUGIN_DISABLED = _kind("plugin_disabled", "bus", "an observer failed train.plugin_max_failures times and was removed",
                        plugin="str: the plugin's name", failures="int: its failures")

RECOVERY = _kind("recovery", "kernel", "the first step after a resume finished; data: where the time since the last "
                 "step before the fault went (trainctl.kernel.recovery), phases that add up to total_s",
                 restarts="int: restarts by torchrun / SLURM", last_step="int|None: the last step the run left",
                 last_step_source="str: events | checkpoint | none", down_s="float: last step -> this process started",
                 process_start_s="float: -> assembly began (interpreter, imports, config)",
                 rendezvous_s="float: -> process group formed", setup_s="float: -> plugins and backend built",
                 checkpoint_load_s="float: -> checkpoint restored", first_step_s="float: -> first step finished",
                 total_s="float: the sum")
STALE_BATCH_DROPPED = _kind("stale_batch_dropped", "kernel", "a producer's batch lagged the policy by more than its "
                            "max_staleness and was not trained on (trainctl.kernel.rollout)",
                            policy_version="int: the version it was generated with", staleness="int: versions behind",
                            max_staleness="int: the producer's limit", dropped="int: batches dropped so far")
ROLLOUT_WAITING = _kind("rollout_waiting", "kernel", "the step's batch cannot come: every rollout worker that could make it "
                        "is unreachable (trainctl.kernel.rollout); sent once per outage, the next rollout event ends it",
                        workers_up="int: workers answering", workers="int: workers configured")
CONFIG_WARNING = _kind("config_warning", "kernel", "the run was set up despite a config problem worth fixing (no controller or "
                      "status plugin, a table for a plugin that is not enabled); message is the stderr line")

# --- built-in plugins -------------------------------------------------------------------------

CONTROL = _kind("control", "controller", "a signal or a `trainctl ctl` command was received or acknowledged",
                signal="str: SIGTERM, SIGINT, SIGUSR1 (signals)", command="str: stop|pause|resume|save|eval (commands)",
                id="str: the command's id (commands)")
CHECKPOINT_CORRUPT = _kind("checkpoint_corrupt", "checkpoint", "resume skipped a checkpoint that does not verify",
                           path="str: the checkpoint", problem="str: why it does not verify")
SAMPLES = _kind("samples", "samples", "text was generated from the fixed prompts",
                prompts="list[str]: the prompts", texts="list[str]: one continuation per prompt")
LAYER_STATS = _kind("layer_stats", "layer_stats", "per-layer norms were measured",
                    **{"*": "float: 'layer.N.weight_norm', 'layer.N.grad_norm', 'embedding.*', 'head.*'"})
LOSS_SPIKE = _kind("loss_spike", "loss_guard", "a logged loss rose above mean + k std of the recent ones",
                   loss="float: the loss", threshold="float: the threshold it crossed")
SKIPPED_UPDATE = _kind("skipped_update", "loss_guard", "the backend skipped non-finite updates",
                       new="int: skipped since the last logged step", total="int: skipped in the run")
METRICS = _kind("metrics", "prometheus", "the metrics endpoint serves", address="str: its URL")
METRICS_UNAVAILABLE = _kind("metrics_unavailable", "prometheus", "the metrics endpoint could not bind; training goes on",
                            error="str: the bind error")
REMOTE_EVAL_SAMPLES = _kind("remote_eval_samples", "remote_eval", "a worker's generations for a checkpoint arrived",
                            samples="list[dict]: prompt and text per sample")
REMOTE_EVAL_PENDING = _kind("remote_eval_pending", "remote_eval", "the run ended with evaluations still open",
                            steps="list[int]: their checkpoints' steps", outbox="str: where they wait")
REMOTE_EVAL_UNAVAILABLE = _kind("remote_eval_unavailable", "remote_eval", "the worker cannot be reached; retrying")
REMOTE_EVAL_REACHABLE = _kind("remote_eval_reachable", "remote_eval", "the worker can be reached again")
REMOTE_EVAL_ERROR = _kind("remote_eval_error", "remote_eval", "a submission was rejected or its evaluation failed")
NOTIFY_FAILED = _kind("notify_failed", "notify", "the end-of-run webhook could not be delivered")

#: Every kind the kernel and the built-in plugins send, by name.
BUILTIN: Mapping[str, NoticeKind] = MappingProxyType(_BUILTIN)


def undeclared(kind: str, declared: Mapping[str, NoticeKind]) -> str:
    """The one line that refuses a notice of an undeclared ``kind``."""
    close = difflib.get_close_matches(kind, sorted(declared), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (
        f"notice kind {kind!r} is not declared{hint}; declare it in the plugin's "
        f"PluginSpec(notices=(NoticeKind(name={kind!r}, sender=..., when=...),)) or use a kind from trainctl.hooks.notices"
    )
