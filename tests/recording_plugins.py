"""Plugins for kernel tests: a recorder of every hook call, scripted deciders and a failing one."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainctl.hooks import PluginSpec, RunInfo, hookimpl
from trainctl.hooks.events import Control, Notice, RunView
from trainctl.hooks.notices import NoticeKind

INSTANCES: dict[str, object] = {}


@dataclass(frozen=True, kw_only=True, slots=True)
class RecorderConfig:
    pass


class Recorder:
    def __init__(self, config, run: RunInfo) -> None:
        self.calls: list[tuple[str, int]] = []
        self.events: list[object] = []
        INSTANCES["recorder"] = self

    def _record(self, name: str, event) -> None:
        self.calls.append((name, getattr(event, "step", getattr(event, "start_step", -1))))
        self.events.append(event)

    @hookimpl
    def trainctl_run_start(self, event): self._record("run_start", event)

    @hookimpl
    def trainctl_step_end(self, event): self._record("step", event)

    @hookimpl
    def trainctl_eval_end(self, event): self._record("eval", event)

    @hookimpl
    def trainctl_rollout_received(self, event): self._record("rollout", event)

    @hookimpl
    def trainctl_weights_published(self, event): self._record("weights_published", event)

    @hookimpl
    def trainctl_checkpoint_saved(self, event): self._record("save", event)

    @hookimpl
    def trainctl_notice(self, event): self._record("notice", event)

    @hookimpl
    def trainctl_run_end(self, event): self._record("run_end", event)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScriptConfig:
    """Decisions by step: ``stop_at``, ``save_at``, ``eval_at``, ``pause_at`` (paused for
    ``pause_polls`` polls)."""

    stop_at: list[int] = field(default_factory=list)
    save_at: list[int] = field(default_factory=list)
    eval_at: list[int] = field(default_factory=list)
    pause_at: list[int] = field(default_factory=list)
    pause_polls: int = 2
    fail: bool = False
    reason: str = "script"


class Script:
    def __init__(self, config: ScriptConfig, run: RunInfo) -> None:
        self.c, self.run = config, run
        self.polls = 0
        INSTANCES["script"] = self

    @hookimpl
    def trainctl_control(self, view: RunView) -> Control | None:
        c = self.c
        if view.state == "paused":
            self.polls += 1
            return Control(pause=self.polls < c.pause_polls)
        if view.state != "running":
            return None
        if view.step in c.pause_at:
            self.run.emit(Notice(step=view.step, kind="script", message="pausing", time=0.0))
        return Control(
            stop=view.step in c.stop_at, save=view.step in c.save_at, evaluate=view.step in c.eval_at,
            pause=view.step in c.pause_at, failed=c.fail, reason=c.reason,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class BoomConfig:
    hook: str = "step"


class Boom:
    """Raises in every step_end (or control) call."""

    def __init__(self, config: BoomConfig, run: RunInfo) -> None:
        self.hook = config.hook

    @hookimpl
    def trainctl_step_end(self, event):
        if self.hook == "step":
            raise ValueError("observer exploded")


class CriticalBoom(Boom):
    pass


@hookimpl
def trainctl_register_plugins(register):
    register(PluginSpec(name="recorder", factory=Recorder, config=RecorderConfig, description="records"))
    register(PluginSpec(name="script", factory=Script, config=ScriptConfig, description="scripted decisions",
                        notices=(NoticeKind(name="script", sender="script", when="a scripted pause is about to start"),)))
    register(PluginSpec(name="boom", factory=Boom, config=BoomConfig, description="fails"))
    register(PluginSpec(name="critical_boom", factory=CriticalBoom, config=BoomConfig, critical=True,
                        description="fails, critically"))
