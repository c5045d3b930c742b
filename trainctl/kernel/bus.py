"""The event bus: a typed facade over the run's pluggy ``PluginManager``, one method per hook.

The rest of trainctl never spells ``pm.hook.x(...)``. Every call goes through pluggy's own
dispatch, so :mod:`trainctl.hooks.spec` is the single source of truth: the call order is the
config's list order (tryfirst/trylast honoured), and ``firstresult`` hooks stop at the first
answer because their spec says so. What the bus adds, it adds at registration
(:meth:`EventBus.register`), so that the plugin manager calls the same implementations:

- each hook implementation is wrapped in a guard that isolates faults per plugin: a
  **critical** plugin that raises → :class:`PluginError`, the loop ends the run as failed; an
  **observer** that raises → reported once with its name (and a ``plugin_error`` notice),
  counted, and after ``max_failures`` failures unregistered while the run goes on; a
  ``ConfigError`` from any plugin (bad input, e.g. ``--resume PATH`` that does not verify)
  propagates as it is: one line and exit code 2;
- an implementation of a hook the spec does not have (a typo: ``trainctl_step_ended``) is a
  ConfigError naming the plugin, the hook and the closest real one (pluggy's ``check_pending``);
- hook wrappers (``wrapper=True``/``hookwrapper=True``) are refused with one line: a wrapper sees
  and may replace the other plugins' answers, which would let one plugin override decisions that
  the kernel combines independently of order (any stop wins), and it would sit outside the
  per-plugin fault isolation;
- the notice kinds a plugin declares (``PluginSpec.notices``) join the vocabulary, and a notice
  of an undeclared kind is refused where it is sent (:mod:`trainctl.hooks.notices`).

``TRAINCTL_TRACE_HOOKS=1`` prints every hook call with its arguments, the plugins answering in
call order and the result to stderr (pluggy's hook-call monitoring).
"""

from __future__ import annotations

import functools
import os
import queue
import reprlib
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pluggy

from trainctl.hooks import notices
from trainctl.hooks.events import (
    CheckpointSaved,
    Control,
    EvalEnd,
    Event,
    Notice,
    RunEnd,
    RunStart,
    RolloutReceived,
    RunView,
    StepEnd,
    WeightsPublished,
    combine,
)
from trainctl.hooks.notices import NoticeKind, UndeclaredNotice
from trainctl.hooks.plugin import PluginSpec
from trainctl.hooks.spec import PROJECT
from trainctl.kernel.errors import ConfigError, PluginError
from trainctl.kernel.registry import check_hooks

_EVENT_HOOKS = {
    RunStart: "trainctl_run_start", StepEnd: "trainctl_step_end", EvalEnd: "trainctl_eval_end",
    CheckpointSaved: "trainctl_checkpoint_saved", Notice: "trainctl_notice",
    RolloutReceived: "trainctl_rollout_received", WeightsPublished: "trainctl_weights_published",
}
_IMPL_MARK = f"{PROJECT}_impl"  # where pluggy's HookimplMarker keeps an implementation's options
#: Hooks whose answer is the training signal itself: a failure there cannot be skipped as an
#: observer's is, so the exception goes to the caller, which ends the run naming the plugin.
_UNGUARDED = frozenset({"trainctl_reward"})


class _Guarded:
    """Stands in for a plugin in the plugin manager: its hook implementations, each guarded."""

    def __init__(self, name: str, plugin: object, impls: dict[str, Callable[..., Any]]) -> None:
        self.plugin, self._name = plugin, name
        self.__dict__.update(impls)  # pluggy finds functions in the instance's __dict__ as they are

    def __repr__(self) -> str:
        return f"<plugin {self._name!r}: {type(self.plugin).__name__}>"


class EventBus:
    def __init__(self, pm: pluggy.PluginManager, *, critical: set[str] = frozenset(),  # type: ignore[assignment]
                 max_failures: int = 3) -> None:
        self._pm = pm
        self._critical = set(critical)
        self._max_failures = max_failures
        self._failures: dict[str, int] = {}
        self._disabled: set[str] = set()
        self._kinds: dict[str, NoticeKind] = dict(notices.BUILTIN)
        self._pending: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._trace = os.environ.get("TRAINCTL_TRACE_HOOKS", "") not in ("", "0")
        if self._trace:
            pm.add_hookcall_monitoring(_trace_before, _trace_after)
        self._reporting = False
        self.step = 0  # the loop keeps this current, for notices the bus makes itself

    # --- registration -----------------------------------------------------------------------

    def register(self, spec: PluginSpec, plugin: object) -> None:
        """Join ``plugin`` (built from ``spec``) to the run. Register in reverse list order:
        pluggy calls the last registered first. Raises ConfigError for a hook wrapper, an
        implementation pluggy rejects (arguments not in the spec), an unknown hook, or a notice
        kind declared twice."""
        name = spec.name
        impls = {}
        for attr in dir(plugin):
            opts = self._pm.parse_hookimpl_opts(plugin, attr)
            if opts is None:
                continue
            hook = opts.get("specname") or attr
            if opts.get("wrapper") or opts.get("hookwrapper"):
                raise ConfigError(
                    f"plugin '{name}' implements {hook} as a hook wrapper, which trainctl does not support: "
                    "hooks answer with return values that the kernel combines; drop wrapper=True/hookwrapper=True"
                )
            impls[attr] = self._guard(name, hook, getattr(plugin, attr), dict(opts))
        for kind in spec.notices:
            self._declare(name, kind)
        try:
            self._pm.register(_Guarded(name, plugin, impls), name=name)
        except pluggy.PluginValidationError as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:])
            raise ConfigError(f"plugin '{name}' does not match the hook spec: {detail}") from None
        if spec.critical:
            self._critical.add(name)
        check_hooks(self._pm, f"plugin '{name}'")

    def _declare(self, plugin: str, kind: NoticeKind) -> None:
        if not isinstance(kind, NoticeKind):
            raise ConfigError(f"plugin '{plugin}' declares notices=({kind!r}, ...); each must be a NoticeKind(name=..., sender=..., when=...)")
        known = self._kinds.get(kind.name)
        if known is not None and known != kind:
            raise ConfigError(
                f"plugin '{plugin}' declares notice kind '{kind.name}', already declared by '{known.sender}'; "
                f"give it a name of its own, e.g. '{plugin}.{kind.name}'"
            )
        self._kinds[kind.name] = kind

    def _guard(self, plugin: str, hook: str, method: Callable[..., Any], opts: dict[str, Any]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if plugin in self._disabled:  # a call already under way when it was disabled
                return None
            try:
                return method(*args, **kwargs)
            except (ConfigError, PluginError):  # bad input: one line and exit 2, from any plugin
                raise
            except Exception as exc:
                if hook in _UNGUARDED:
                    raise
                self._failed(plugin, hook, exc)
                return None

        functools.update_wrapper(guarded, method)  # pluggy reads the argument names through __wrapped__
        setattr(guarded, _IMPL_MARK, opts)
        return guarded

    # --- lifecycle events -----------------------------------------------------------------

    def run_start(self, event: RunStart) -> None:
        self._pm.hook.trainctl_run_start(event=event)

    def step_end(self, event: StepEnd) -> None:
        self._pm.hook.trainctl_step_end(event=event)

    def rollout_received(self, event: RolloutReceived) -> None:
        self._pm.hook.trainctl_rollout_received(event=event)

    def weights_published(self, event: WeightsPublished) -> None:
        self._pm.hook.trainctl_weights_published(event=event)

    def eval_end(self, event: EvalEnd) -> None:
        self._pm.hook.trainctl_eval_end(event=event)

    def checkpoint_saved(self, event: CheckpointSaved) -> None:
        self._pm.hook.trainctl_checkpoint_saved(event=event)

    def notice(self, event: Notice) -> None:
        self._check_kind(event)
        self._pm.hook.trainctl_notice(event=event)

    def run_end(self, event: RunEnd) -> None:
        """Call each plugin's run_end in turn. Events a plugin emits from its run_end (a last
        remote result, a notice that a webhook failed) are delivered at once to the plugins
        whose run_end has not run yet, so loggers record them; nothing reaches a plugin after
        its own run_end."""
        caller = self._pm.hook.trainctl_run_end
        order = [impl.plugin for impl in reversed(caller.get_hookimpls())]  # call order
        ended: set[str] = set()
        for plugin in order:
            self._pm.subset_hook_caller("trainctl_run_end", [p for p in order if p is not plugin])(event=event)
            ended.add(self._pm.get_name(plugin) or "")
            while not self._pending.empty():
                self.dispatch(self._pending.get_nowait(), skip=ended)

    def emit(self, event: Event) -> None:
        """Queue an event from any thread; :meth:`deliver_pending` hands it to the plugins.
        Raises :class:`UndeclaredNotice` (in the sender) for a notice of an undeclared kind."""
        if isinstance(event, Notice):
            self._check_kind(event)
        self._pending.put(event)

    def deliver_pending(self) -> list[Event]:
        """Deliver queued events on the calling (training) thread; returns what was delivered."""
        delivered = []
        while not self._pending.empty():
            event = self._pending.get_nowait()
            self.dispatch(event)
            delivered.append(event)
        return delivered

    def dispatch(self, event: Event, *, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Fire the hook that matches an event payload (on every plugin but those named in ``skip``)."""
        if isinstance(event, RunEnd):
            self.run_end(event)
            return
        hook = _EVENT_HOOKS[type(event)]
        skipped = [p for p in map(self._pm.get_plugin, skip) if p is not None]
        self._pm.subset_hook_caller(hook, skipped)(event=event)

    def _check_kind(self, event: Notice) -> None:
        if event.kind not in self._kinds:
            raise UndeclaredNotice(notices.undeclared(event.kind, self._kinds))

    # --- decisions ------------------------------------------------------------------------

    def lr(self, step: int, base_lr: float) -> float:
        answers = self._answers("trainctl_lr", step=step, base_lr=base_lr)
        return float(answers[0]) if answers else base_lr

    def control(self, view: RunView) -> Control:
        return combine(self._answers("trainctl_control", view=view))

    def has_loss_terms(self) -> bool:
        return bool(self._pm.hook.trainctl_loss_terms.get_hookimpls())

    def loss_terms(self, logits: Any, targets: Any, loss: Any) -> list[tuple[str, Any]]:
        return self._answers("trainctl_loss_terms", logits=logits, targets=targets, loss=loss)

    def has_eval_metrics(self) -> bool:
        return bool(self._pm.hook.trainctl_eval_metrics.get_hookimpls())

    def eval_metrics(self, split: str, logits: Any, targets: Any) -> dict[str, tuple[Any, Any]]:
        merged: dict[str, tuple[Any, Any]] = {}
        for answer in self._answers("trainctl_eval_metrics", split=split, logits=logits, targets=targets):
            for name, value in answer.items():
                merged.setdefault(name, value)  # the first plugin in list order keeps a name
        return merged

    def reward_plugins(self) -> dict[str, Callable[[list[Any], list[Any], list[dict[str, Any]]], Sequence[float] | None]]:
        """The enabled plugins that implement ``trainctl_reward``, by name, each as the function
        that asks that plugin alone (``BackendContext.rewards``)."""
        return {impl.plugin_name: functools.partial(self.reward, impl.plugin_name)
                for impl in reversed(self._pm.hook.trainctl_reward.get_hookimpls())}

    def reward(self, plugin: str, prompts: list[Any], completions: list[Any], rows: list[dict[str, Any]]) -> Sequence[float] | None:
        """``plugin``'s own answer to ``trainctl_reward`` (each reward is scored apart; TRL weighs
        them); None when it gave none. Its exceptions reach the caller (``_UNGUARDED``)."""
        others = [p for p in self._pm.get_plugins() if self._pm.get_name(p) != plugin]
        answers = self._pm.subset_hook_caller("trainctl_reward", others)(prompts=prompts, completions=completions, rows=rows)
        return answers[0] if answers else None

    def check_config(self, config: Mapping[str, Any]) -> list[str]:
        return [problem for problems in self._answers("trainctl_check_config", config=config) for problem in problems]

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for states in self._answers("trainctl_state_dict"):
            merged.update(states)
        return merged

    def load_state_dict(self, states: Mapping[str, Any]) -> None:
        self._pm.hook.trainctl_load_state_dict(states=states)

    def write_checkpoint(self, step: int, reason: str, write: Callable[[Path], None]) -> Path | None:
        answers = self._answers("trainctl_write_checkpoint", step=step, reason=reason, write=write)
        return Path(answers[0]) if answers else None

    def can_write_checkpoints(self) -> bool:
        return bool(self._pm.hook.trainctl_write_checkpoint.get_hookimpls())

    def find_checkpoint(self, resume: str) -> Path | None:
        answers = self._answers("trainctl_find_checkpoint", resume=resume)
        return Path(answers[0]) if answers else None

    # --- machinery ------------------------------------------------------------------------

    def _answers(self, hook: str, **kwargs: Any) -> list[Any]:
        """The non-None answers, as a list whatever the spec says: a ``firstresult`` hook (read
        from the spec, as pluggy does) gives at most one."""
        caller = getattr(self._pm.hook, hook)
        result = caller(**kwargs)
        if caller.spec.opts.get("firstresult"):
            return [] if result is None else [result]
        return result

    def _failed(self, plugin: str, hook: str, exc: Exception) -> None:
        if plugin in self._critical:
            raise PluginError(plugin, hook, exc) from exc
        count = self._failures[plugin] = self._failures.get(plugin, 0) + 1
        disable = count >= self._max_failures
        if count == 1:
            print(f"trainctl: plugin '{plugin}' failed in {hook}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if self._trace:
                traceback.print_exception(exc, file=sys.stderr)
        if disable:
            print(f"trainctl: plugin '{plugin}' disabled after {count} failures", file=sys.stderr)
            self._disabled.add(plugin)
            self._pm.unregister(name=plugin)
        if self._reporting:  # a failure while reporting a failure: stop here
            return
        self._reporting = True
        try:
            self.notice(Notice(
                step=self.step, kind=notices.PLUGIN_DISABLED if disable else notices.PLUGIN_ERROR,
                message=f"{plugin} in {hook}: {type(exc).__name__}: {exc}",
                data={"plugin": plugin, "failures": count}, time=time.time(),
            ))
        finally:
            self._reporting = False


# --- TRAINCTL_TRACE_HOOKS=1 -----------------------------------------------------------------

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 80, 200, 8, 8


def _trace_before(hook: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, object]) -> None:
    args = ", ".join(f"{k}={_short.repr(v)}" for k, v in kwargs.items())
    plugins = ", ".join(impl.plugin_name for impl in reversed(impls)) or "no plugin"
    print(f"[trainctl hook] {hook}({args}) -> {plugins}", file=sys.stderr)


def _trace_after(outcome: pluggy.Result[Any], hook: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, object]) -> None:
    shown = f"raised {outcome.exception!r}" if outcome.exception is not None else f"= {_short.repr(outcome.get_result())}"
    print(f"[trainctl hook] {hook} {shown}", file=sys.stderr)
