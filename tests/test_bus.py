"""The bus obeys the hook spec: pluggy's dispatch, the spec's firstresult, unknown hooks and
wrappers refused at registration, per-plugin fault isolation, hook tracing with arguments."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from trainctl.hooks import NoticeKind, PluginSpec, hookimpl, notices
from trainctl.hooks.events import Control, Notice, RunEnd, RunView
from trainctl.hooks.notices import UndeclaredNotice
from trainctl.kernel.bus import EventBus
from trainctl.kernel.errors import ConfigError, PluginError
from trainctl.kernel.registry import new_plugin_manager

VIEW = RunView(step=1, max_steps=10, state="running", last_loss=None, last_val_loss=None, evaluated=False, time=0.0)


def bus_with(*plugins: tuple[str, object], critical: bool = False, max_failures: int = 3, **spec) -> EventBus:
    """A bus with ``plugins`` registered in list order (call order), like a run does."""
    bus = EventBus(new_plugin_manager(), max_failures=max_failures)
    for name, plugin in reversed(plugins):
        bus.register(PluginSpec(name=name, factory=lambda c, r: None, critical=critical, **spec), plugin)
    return bus


class Lr:
    def __init__(self, answer, calls: list) -> None:
        self.answer, self.calls = answer, calls

    @hookimpl
    def trainctl_lr(self, step, base_lr):
        self.calls.append(self)
        return self.answer


def test_firstresult_comes_from_the_spec_and_list_order_is_call_order():
    calls: list = []
    a, b, c = Lr(None, calls), Lr(0.5, calls), Lr(0.25, calls)
    bus = bus_with(("a", a), ("b", b), ("c", c))
    assert bus.lr(3, 1.0) == 0.5
    assert calls == [a, b]  # the spec says firstresult: c is never asked
    hook = bus._pm.hook.trainctl_lr
    assert hook.spec.opts["firstresult"] and not bus._pm.hook.trainctl_control.spec.opts["firstresult"]
    assert bus_with(("a", Lr(None, []))).lr(3, 1.0) == 1.0  # no answer: the base lr


def test_control_combines_every_answer():
    class Decide:
        def __init__(self, control): self.control = control

        @hookimpl
        def trainctl_control(self, view): return self.control

    bus = bus_with(("save", Decide(Control(save=True, reason="best"))), ("stop", Decide(Control(stop=True, reason="signal"))))
    decision = bus.control(VIEW)
    assert decision.stop and decision.save and decision.reason == "signal"


def test_unknown_hook_is_a_config_error_with_the_closest_real_hook():
    class Typo:
        @hookimpl
        def trainctl_step_ended(self, event): ...

    with pytest.raises(ConfigError) as info:
        bus_with(("typo", Typo()))
    assert str(info.value) == "plugin 'typo' implements unknown hook trainctl_step_ended; did you mean trainctl_step_end?"

    class Nonsense:
        @hookimpl(optionalhook=True)
        def trainctl_from_the_future(self): ...

        @hookimpl
        def trainctl_xyzzy_frobnicate(self): ...

    with pytest.raises(ConfigError, match="unknown hook trainctl_xyzzy_frobnicate; the hooks are listed in trainctl.hooks.spec"):
        bus_with(("nonsense", Nonsense()))


def test_optional_hooks_are_allowed():
    class Optional:
        @hookimpl(optionalhook=True)
        def trainctl_future_hook(self, event): ...

    bus_with(("optional", Optional()))  # pluggy's optionalhook: no error


@pytest.mark.parametrize("mark", [{"wrapper": True}, {"hookwrapper": True}])
def test_wrappers_are_refused_with_one_line(mark):
    class Wrapper:
        @hookimpl(**mark)
        def trainctl_lr(self, step, base_lr):
            return (yield)

    with pytest.raises(ConfigError) as info:
        bus_with(("wrap", Wrapper()))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("plugin 'wrap' implements trainctl_lr as a hook wrapper")
    assert "drop wrapper=True" in message


def test_an_argument_not_in_the_spec_is_one_config_error_line():
    class BadArgs:
        @hookimpl
        def trainctl_step_end(self, event, extra): ...

    with pytest.raises(ConfigError) as info:
        bus_with(("bad", BadArgs()))
    assert "\n" not in str(info.value) and "plugin 'bad' does not match the hook spec" in str(info.value)
    assert "extra" in str(info.value)


class Fails:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def trainctl_lr(self, step, base_lr):
        self.calls += 1
        raise ValueError("bad schedule")


def test_an_observer_that_fails_is_skipped_then_disabled(capsys):
    seen: list[Notice] = []

    class Listener:
        @hookimpl
        def trainctl_notice(self, event): seen.append(event)

    failing = Fails()
    bus = bus_with(("fails", failing), ("fallback", Lr(0.5, [])), ("listener", Listener()), max_failures=2)
    assert bus.lr(0, 1.0) == 0.5  # a failed first answer: the next plugin answers
    assert bus.lr(1, 1.0) == 0.5
    assert bus.lr(2, 1.0) == 0.5
    assert failing.calls == 2  # disabled after two failures: not asked again
    assert [n.kind for n in seen] == [notices.PLUGIN_ERROR, notices.PLUGIN_DISABLED]
    err = capsys.readouterr().err
    assert err.count("plugin 'fails' failed in trainctl_lr: ValueError: bad schedule") == 1
    assert "plugin 'fails' disabled after 2 failures" in err


def test_a_critical_plugin_that_fails_raises_plugin_error():
    with pytest.raises(PluginError, match="plugin 'fails' failed in trainctl_lr: ValueError: bad schedule"):
        bus_with(("fails", Fails()), critical=True).lr(0, 1.0)


def test_config_errors_propagate_from_any_plugin():
    class Refuses:
        @hookimpl
        def trainctl_find_checkpoint(self, resume):
            raise ConfigError("cannot resume from nowhere")

    with pytest.raises(ConfigError, match="cannot resume from nowhere"):
        bus_with(("refuses", Refuses())).find_checkpoint("nowhere")


def test_run_end_goes_plugin_by_plugin_and_late_events_reach_only_those_still_to_end():
    log: list[tuple[str, str]] = []

    class Ender:
        def __init__(self, name: str, bus_ref: list) -> None:
            self.name, self.bus_ref = name, bus_ref

        @hookimpl
        def trainctl_run_end(self, event):
            log.append((self.name, "run_end"))
            if self.name == "first":
                self.bus_ref[0].emit(Notice(step=1, kind=notices.NOTIFY_FAILED, time=0.0))

        @hookimpl
        def trainctl_notice(self, event):
            log.append((self.name, event.kind))

    ref: list = []
    bus = bus_with(("first", Ender("first", ref)), ("second", Ender("second", ref)))
    ref.append(bus)
    bus.run_end(RunEnd(status="completed", step=1, tokens=1, duration=0.0, time=0.0))
    assert log == [("first", "run_end"), ("second", "notify_failed"), ("second", "run_end")]


def test_undeclared_notice_kinds_are_refused_where_they_are_sent():
    bus = bus_with()
    with pytest.raises(UndeclaredNotice) as info:
        bus.emit(Notice(step=0, kind="sampels", time=0.0))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("notice kind 'sampels' is not declared (did you mean 'samples'?)")
    assert "PluginSpec(notices=" in message
    with pytest.raises(UndeclaredNotice):
        bus.notice(Notice(step=0, kind="never_declared", time=0.0))
    bus.emit(Notice(step=0, kind=notices.SAMPLES, time=0.0))  # declared: queued


def test_a_plugin_declares_its_own_notice_kinds():
    kind = NoticeKind(name="x.found", sender="x", when="x found something", data={"what": "str"})
    seen: list = []

    class Listener:
        @hookimpl
        def trainctl_notice(self, event): seen.append(event.kind)

    bus = bus_with(("x", Listener()), notices=(kind,))
    bus.emit(Notice(step=0, kind="x.found", time=0.0))
    bus.deliver_pending()
    assert seen == ["x.found"]
    clash = NoticeKind(name="samples", sender="x", when="mine")
    with pytest.raises(ConfigError, match="declares notice kind 'samples', already declared by 'samples'"):
        bus_with(("x", Listener()), notices=(clash,))


def test_an_observer_sending_an_undeclared_kind_is_a_plugin_failure(capsys):
    class Sloppy:
        def __init__(self) -> None:
            self.bus: EventBus | None = None

        @hookimpl
        def trainctl_control(self, view):
            self.bus.emit(Notice(step=view.step, kind="my_thing", time=time.time()))

    sloppy = Sloppy()
    bus = bus_with(("sloppy", sloppy))
    sloppy.bus = bus
    assert bus.control(VIEW) == Control()
    err = capsys.readouterr().err
    assert "plugin 'sloppy' failed in trainctl_control: UndeclaredNotice: notice kind 'my_thing' is not declared" in err


def test_trace_shows_arguments_plugins_and_results():
    code = (
        "from trainctl.hooks import PluginSpec, hookimpl\n"
        "from trainctl.kernel.bus import EventBus\n"
        "from trainctl.kernel.registry import new_plugin_manager\n"
        "class Lr:\n"
        "    @hookimpl\n"
        "    def trainctl_lr(self, step, base_lr): return base_lr / 2\n"
        "bus = EventBus(new_plugin_manager())\n"
        "bus.register(PluginSpec(name='halve', factory=None), Lr())\n"
        "bus.lr(7, 0.5)\n"
    )
    env = {"TRAINCTL_TRACE_HOOKS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert proc.returncode == 0, proc.stderr
    assert "[trainctl hook] trainctl_lr(step=7, base_lr=0.5) -> halve" in proc.stderr
    assert "[trainctl hook] trainctl_lr = 0.25" in proc.stderr


class Reward:
    def __init__(self, answer) -> None:
        self.answer, self.calls = answer, 0

    @hookimpl
    def trainctl_reward(self, prompts, completions, rows):
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return [self.answer] * len(completions)


def test_a_reward_is_asked_of_its_plugin_alone_and_its_failure_reaches_the_caller(capsys):
    one, two, down = Reward(1.0), Reward(2.0), Reward(RuntimeError("the grader is down"))
    bus = bus_with(("one", one), ("two", two), ("down", down), ("observer", Lr(None, [])))
    rewards = bus.reward_plugins()
    assert list(rewards) == ["one", "two", "down"]  # the plugins that implement it, in list order
    assert rewards["two"](["p", "p"], ["a", "b"], [{}, {}]) == [2.0, 2.0]
    assert (one.calls, two.calls) == (0, 1)  # the other reward plugins are not asked
    for _ in range(4):  # past max_failures: a reward is never disabled, its failure is never swallowed
        with pytest.raises(RuntimeError, match="the grader is down"):
            rewards["down"](["p"], ["a"], [{}])
    assert "failed" not in capsys.readouterr().err and down.calls == 4
