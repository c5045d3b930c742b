"""The hook specification: every hook trainctl calls, grouped by when it fires.

This module is the single source of truth. Each hook's docstring says when it fires, what an
implementation may return and how the kernel combines the results. Hooks are called in the order
of the config's ``plugins`` list, through pluggy's own dispatch: ``firstresult=True`` here is what
makes the bus stop at the first answer, and an implementation of a hook that is not here is
refused when the run starts (``trainctl.kernel.bus``). A test fails when a hook here has no docstring or when an event
in ``trainctl.hooks.events`` has no hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from trainctl.hooks.events import (
    CheckpointSaved,
    Control,
    EvalEnd,
    Notice,
    RunEnd,
    RunStart,
    RolloutReceived,
    RunView,
    StepEnd,
    WeightsPublished,
)
from trainctl.hooks.plugin import BackendSpec, PluginSpec

if TYPE_CHECKING:
    import click
    import torch

PROJECT = "trainctl"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration: what exists (called on every installed plugin module, enabled or not) ----


@hookspec
def trainctl_register_plugins(register: Callable[[PluginSpec], None]) -> None:
    """Make plugins *available* by calling ``register(PluginSpec(...))`` once per plugin.

    Called when the registry is built, on trainctl's built-in modules and on every module of the
    ``trainctl.plugins`` entry-point group. Registering enables nothing: only a config's
    ``plugins`` list does. Must not import heavy libraries (torch, transformers).
    """


@hookspec
def trainctl_register_backends(register: Callable[[BackendSpec], None]) -> None:
    """Make backends available by calling ``register(BackendSpec(...))`` once per backend.

    Called with the registry like ``trainctl_register_plugins``. The spec names its factory as
    ``"module:attr"`` so that nothing heavy is imported until a run uses the backend.
    """


@hookspec
def trainctl_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``trainctl`` click group (``@cli.command()``).

    Called when the CLI starts. Command bodies should import their dependencies lazily: this
    runs for ``trainctl --help``, which must stay fast and must not import torch.
    """


# --- setup: before the first step (called on enabled plugins) -------------------------------


@hookspec
def trainctl_check_config(config: Mapping[str, Any]) -> list[str] | None:
    """Check the fully resolved config (read-only) for problems that involve more than the
    plugin's own table, e.g. a warmup longer than the run.

    Return a list of one-line problems, each naming the key and the fix. Called after every table
    validated on its own and before any training; any problem from any plugin is a config error
    (exit 2).
    """


# --- lifecycle events: observers (return values are ignored) --------------------------------


@hookspec
def trainctl_run_start(event: RunStart) -> None:
    """The run is set up and restored from its checkpoint if resuming; no step has run yet.
    Events a plugin emits here (``run.emit``) are delivered right after every plugin has seen
    this one, before any evaluation or step."""


@hookspec
def trainctl_step_end(event: StepEnd) -> None:
    """An optimizer step finished. Fires every step; ``event.logged`` says whether the loss was
    measured (every ``train.log_interval`` steps). Keep work on non-logged steps trivial."""


@hookspec
def trainctl_rollout_received(event: RolloutReceived) -> None:
    """A rollout backend's producer delivered the batch of the next step, before the step runs
    (``trainctl.kernel.rollout``); never fires for dataset backends. Once per step, on every
    rank, with host values only: keep the work trivial, as for ``trainctl_step_end``. A batch
    too stale to train on is not received: it is a ``stale_batch_dropped`` notice instead."""


@hookspec
def trainctl_weights_published(event: WeightsPublished) -> None:
    """A rollout backend's optimizer stepped and its producer took the new weights (right
    after the step, before ``trainctl_step_end``). Once per step; rollout backends only."""


@hookspec
def trainctl_eval_end(event: EvalEnd) -> None:
    """One split was evaluated (``source = "local"`` in the loop, ``"remote"`` from a worker)."""


@hookspec
def trainctl_checkpoint_saved(event: CheckpointSaved) -> None:
    """A complete checkpoint was written (its manifest is in place)."""


@hookspec
def trainctl_notice(event: Notice) -> None:
    """Something worth recording happened (control acknowledged, loss spike, samples, a plugin
    disabled). Any plugin may queue one with ``run.emit(Notice(...))``; loggers record it.

    ``event.kind`` is one of a declared vocabulary, :mod:`trainctl.hooks.notices`, which says for
    each kind who sends it, when, and what ``data`` holds; match on its constants. The kernel
    itself sends ``evaluating`` (just before an evaluation starts) and ``saving`` (just before a
    checkpoint is written; ``message`` is the reason) so that observers can show what a long
    pause between steps is, ``paused`` and ``resumed``; the bus ``plugin_error`` and
    ``plugin_disabled``. A plugin declares the kinds it adds with ``PluginSpec(notices=...)``; a
    kind nobody declared is refused where it is sent."""


@hookspec
def trainctl_run_end(event: RunEnd) -> None:
    """The run is over (completed, stopped or failed). Release resources here: nothing fires
    after this, and it fires even when the run failed.

    Plugins get it one at a time, in call order. An event that a plugin emits here (``run.emit``:
    a last result, a notice that a webhook failed) is delivered at once to the plugins whose
    ``run_end`` has not run yet, so loggers record it; mark the implementation
    ``@hookimpl(tryfirst=True)`` to report before every logger ends."""


# --- decisions: the kernel asks, plugins answer ----------------------------------------------


@hookspec(firstresult=True)
def trainctl_lr(step: int, base_lr: float) -> float | None:
    """The learning rate for the update about to happen (``step`` is 0-based: the number of
    completed steps). First non-None answer wins; with none, ``base_lr`` (``optim.lr``) is used.
    Must be a pure function of ``step``: resume relies on it."""


@hookspec
def trainctl_control(view: RunView) -> Control | None:
    """Decide whether to stop, save, evaluate or pause, after every step (``view.state ==
    "running"``), repeatedly while paused (``"paused"``), about every half second while a rollout
    producer's workers are unreachable (``"waiting"``: a stop ends the run before the step, a
    pause is moot, it is waiting already), and once when the run is about to end (``"ending"``:
    last step reached or a stop decided; only ``save``/``evaluate`` count then).

    Return ``None`` for no opinion. The kernel combines every answer with
    ``trainctl.hooks.events.combine``: any stop wins, save/evaluate if anyone asks, paused while
    anyone answers ``pause``. Called every step: keep it cheap (no I/O beyond a stat or a
    scandir of a small directory).

    Distributed runs: called on every rank; the kernel then agrees across ranks (a flag set on
    any rank holds on all, at the same step; every ``train.control_interval`` steps), so a
    plugin may decide on one rank only (rank 0 reading commands, one rank's signal).
    """


@hookspec
def trainctl_loss_terms(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """Add a term to the training loss: return ``(name, term)`` with ``term`` a scalar tensor on
    the loss's device; the backend adds it before backward. ``logits`` are (B, T, V), ``targets``
    (B, T) with -1/-100 for ignored positions, ``loss`` the micro-batch's mean cross-entropy over
    its scored tokens (0-d, on every backend). The term counts as the mean over the step's
    micro-batches.

    Called for every training micro-batch, never during evaluation. Do not read device values
    here (no ``.item()``): the term's mean is reported in the step event as ``metrics[name]`` on
    logged steps.
    """


# --- evaluation: what a split's predictions measure ------------------------------------------


@hookspec
def trainctl_eval_metrics(split: str, logits: torch.Tensor, targets: torch.Tensor) -> Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Metrics of an evaluation computed from the model's predictions, as transformers'
    ``compute_metrics`` does, without keeping the split's logits: called once per evaluation batch
    of ``split`` with that batch's (B, T, V) ``logits`` and (B, T) ``targets`` (aligned: position t
    predicts ``targets[:, t]``; ignored positions negative, -1 or -100).

    Return ``{name: (total, count)}``, each a 0-d tensor on the logits' device (e.g. correct
    tokens and scored tokens). The kernel's scoring sums both over the split's batches on the
    device, reads them with the loss (the one host read of a split), and reports ``total / count``
    as ``metrics[name]`` of the split's eval event (jsonl, console, Prometheus' eval metric, ...).
    Do not read device values here (no ``.item()``). A name answered by several plugins is the
    first's (list order); ``loss``, ``accuracy`` and ``perplexity`` stay the kernel's. A plugin that
    raises is reported in one line naming it, and its metric is left out of that split's event.

    Costs nothing unless a plugin implements it: only then does a backend materialise the logits
    of an evaluation batch (hf: instead of its fused head, one batch at a time). Token-predicting
    backends call it (gpt, hf SFT); ``hf.objective = "dpo"`` evaluates pairs and refuses it.
    """


# --- online RL: what a completion is worth ---------------------------------------------------


@hookspec
def trainctl_reward(prompts: list[Any], completions: list[Any], rows: list[dict[str, Any]]) -> Sequence[float] | None:
    """Score a batch of generated completions for online RL (``[hf] objective = "grpo"``):
    return one finite float per completion. ``completions[i]`` was generated for ``prompts[i]``
    from the dataset row ``rows[i]`` (its columns as plain values); each prompt is repeated
    ``hf.grpo.num_generations`` times, as TRL passes them, and a prompt or completion is text, or
    a conversation's list of messages when the data's prompts are.

    A plugin is a reward only when it is enabled (the ``plugins`` list) *and* named in
    ``hf.grpo.rewards``; a name there that no enabled plugin answers is a config error before
    the model loads. Each named plugin's implementation is called alone (not the hook of every
    plugin), once per generation batch, in the order ``hf.grpo.rewards`` gives; TRL weighs the
    rewards by ``hf.grpo.reward_weights`` and logs ``rewards/<plugin>/mean``. A reward is the
    training signal, not an observer: an exception, ``None``, a NaN or a wrong number of values
    ends the run in one line naming the plugin (exit 2), whatever ``train.plugin_max_failures``
    says. Called on the host with host values; it may take time (a grader, a sandbox), which
    the step's generation time includes. The eval worker and ``trainctl eval`` never call it.
    """


# --- checkpoints: state that must survive a resume ------------------------------------------


@hookspec
def trainctl_state_dict() -> Mapping[str, Any] | None:
    """Return ``{plugin_name: state}`` with the state this plugin needs after a resume (plain
    JSON values). The kernel merges every answer into the checkpoint's ``plugins.json``."""


@hookspec
def trainctl_load_state_dict(states: Mapping[str, Any]) -> None:
    """Restore from a checkpoint: ``states`` is the merged mapping that ``trainctl_state_dict``
    produced; take your own key, if present. Called before ``trainctl_run_start``."""


@hookspec(firstresult=True)
def trainctl_write_checkpoint(step: int, reason: str, write: Callable[[Path], None]) -> Path | None:
    """Write a checkpoint: create a fresh directory, call ``write(directory)`` (the kernel and
    the backend fill it), make it durable, and return its final path. First answer wins; the
    kernel then fires ``trainctl_checkpoint_saved``. Implemented by the ``checkpoint`` plugin;
    with no implementation save decisions are ignored with a warning.

    Distributed runs: called on every rank at the same step; every rank's ``write`` must land in
    the same directory before it is sealed (the checkpoint plugin uses ``RunInfo.group``)."""


@hookspec(firstresult=True)
def trainctl_find_checkpoint(resume: str) -> Path | None:
    """Choose the checkpoint to resume from. ``resume`` is ``auto`` (newest complete checkpoint
    of this run, if any), ``never``, or a path (which must verify). Return its directory or None
    to start fresh; raise ``trainctl.kernel.errors.ConfigError`` if an explicit path is bad."""
