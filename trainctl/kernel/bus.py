"""The event bus: a typed facade over the run's pluggy ``PluginManager``, one method per hook.

The rest of trainctl never spells ``pm.hook.x(...)``. The bus calls each plugin's hook
implementation itself (in pluggy's order: the config's list order, tryfirst/trylast honoured)
rather than through pluggy's multicall, because that is what lets it isolate faults per plugin:

- a **critical** plugin that raises → :class:`PluginError`; the loop ends the run as failed;
- an **observer** that raises → reported once with its name (and a ``plugin_error`` notice),
  counted, and after ``max_failures`` failures unregistered; the run goes on.

``TRAINCTL_TRACE_HOOKS=1`` prints every hook call and the plugin answering it to stderr.
"""

from __future__ import annotations

import os
import queue
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pluggy

from trainctl.hooks.events import (
    CheckpointSaved,
    Control,
    EvalEnd,
    Event,
    Notice,
    RunEnd,
    RunStart,
    RunView,
    StepEnd,
    combine,
)
from trainctl.kernel.errors import PluginError

_Impl = tuple[str, Callable[..., Any], tuple[str, ...]]
_EVENT_HOOKS = {
    RunStart: "trainctl_run_start", StepEnd: "trainctl_step_end", EvalEnd: "trainctl_eval_end",
    CheckpointSaved: "trainctl_checkpoint_saved", Notice: "trainctl_notice",
}


class EventBus:
    def __init__(self, pm: pluggy.PluginManager, *, critical: set[str], max_failures: int = 3) -> None:
        self._pm = pm
        self._critical = critical
        self._max_failures = max_failures
        self._failures: dict[str, int] = {}
        self._impls: dict[str, list[_Impl]] = {}
        self._pending: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._trace = os.environ.get("TRAINCTL_TRACE_HOOKS", "") not in ("", "0")
        self._reporting = False
        self.step = 0  # the loop keeps this current, for notices the bus makes itself

    # --- lifecycle events -----------------------------------------------------------------

    def run_start(self, event: RunStart) -> None:
        self._call("trainctl_run_start", event=event)

    def step_end(self, event: StepEnd) -> None:
        self._call("trainctl_step_end", event=event)

    def eval_end(self, event: EvalEnd) -> None:
        self._call("trainctl_eval_end", event=event)

    def checkpoint_saved(self, event: CheckpointSaved) -> None:
        self._call("trainctl_checkpoint_saved", event=event)

    def notice(self, event: Notice) -> None:
        self._call("trainctl_notice", event=event)

    def run_end(self, event: RunEnd) -> None:
        """Call each plugin's run_end in turn. Events a plugin emits from its run_end (a last
        remote result, a notice that a webhook failed) are delivered at once to the plugins
        whose run_end has not run yet, so loggers record them; nothing reaches a plugin after
        its own run_end."""
        ended: set[str] = set()
        for plugin, _, _ in list(self._impls_of("trainctl_run_end")):
            self._call("trainctl_run_end", only=plugin, event=event)
            ended.add(plugin)
            while not self._pending.empty():
                self.dispatch(self._pending.get_nowait(), skip=ended)

    def emit(self, event: Event) -> None:
        """Queue an event from any thread; :meth:`deliver_pending` hands it to the plugins."""
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
        """Fire the hook that matches an event payload (on every plugin but those in ``skip``)."""
        if isinstance(event, RunEnd):
            self.run_end(event)
        else:
            self._call(_EVENT_HOOKS[type(event)], skip=skip, event=event)

    # --- decisions ------------------------------------------------------------------------

    def lr(self, step: int, base_lr: float) -> float:
        answers = self._call("trainctl_lr", first=True, step=step, base_lr=base_lr)
        return float(answers[0]) if answers else base_lr

    def control(self, view: RunView) -> Control:
        return combine(self._call("trainctl_control", view=view))

    def has_loss_terms(self) -> bool:
        return bool(self._impls_of("trainctl_loss_terms"))

    def loss_terms(self, logits: Any, targets: Any, loss: Any) -> list[tuple[str, Any]]:
        return self._call("trainctl_loss_terms", logits=logits, targets=targets, loss=loss)

    def check_config(self, config: Mapping[str, Any]) -> list[str]:
        return [problem for problems in self._call("trainctl_check_config", config=config) for problem in problems]

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for states in self._call("trainctl_state_dict"):
            merged.update(states)
        return merged

    def load_state_dict(self, states: Mapping[str, Any]) -> None:
        self._call("trainctl_load_state_dict", states=states)

    def write_checkpoint(self, step: int, reason: str, write: Callable[[Path], None]) -> Path | None:
        answers = self._call("trainctl_write_checkpoint", first=True, step=step, reason=reason, write=write)
        return Path(answers[0]) if answers else None

    def can_write_checkpoints(self) -> bool:
        return bool(self._impls_of("trainctl_write_checkpoint"))

    def find_checkpoint(self, resume: str) -> Path | None:
        answers = self._call("trainctl_find_checkpoint", first=True, resume=resume)
        return Path(answers[0]) if answers else None

    # --- machinery ------------------------------------------------------------------------

    def _impls_of(self, hook: str) -> list[_Impl]:
        impls = self._impls.get(hook)
        if impls is None:
            caller = getattr(self._pm.hook, hook)
            # pluggy calls the last registered first; the kernel registers in reverse list order
            impls = [
                (impl.plugin_name, impl.function, tuple(impl.argnames))
                for impl in reversed(caller.get_hookimpls())
            ]
            self._impls[hook] = impls
        return impls

    def _call(self, hook: str, *, first: bool = False, only: str | None = None,
              skip: set[str] = frozenset(), **kwargs: Any) -> list[Any]:  # type: ignore[assignment]
        results = []
        for plugin, function, argnames in self._impls_of(hook):
            if plugin in skip or (only is not None and plugin != only):
                continue
            if self._trace:
                print(f"[trainctl hook] {hook} -> {plugin}", file=sys.stderr)
            try:
                result = function(*[kwargs[name] for name in argnames])
            except Exception as exc:
                self._failed(plugin, hook, exc)
                continue
            if result is not None:
                results.append(result)
                if first:
                    break
        return results

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
            self._pm.unregister(name=plugin)
            self._impls.clear()
        if self._reporting:  # a failure while reporting a failure: stop here
            return
        self._reporting = True
        try:
            self.notice(Notice(
                step=self.step, kind="plugin_disabled" if disable else "plugin_error",
                message=f"{plugin} in {hook}: {type(exc).__name__}: {exc}",
                data={"plugin": plugin, "failures": count}, time=time.time(),
            ))
        finally:
            self._reporting = False
