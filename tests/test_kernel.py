"""The real kernel (loop, bus, config, plugins) driven by the fake backend."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_config
from tests.recording_plugins import INSTANCES
from trainctl.hooks.events import Control, combine
from trainctl.kernel.run import Run


def run(registry, tmp_path, *overrides, resume="never"):
    config = make_config(registry, tmp_path / "out", *overrides)
    session = Run(config, registry, resume=resume)
    return session, session.fit()


def test_event_order_and_cadence(registry, tmp_path):
    session, result = run(
        registry, tmp_path, 'plugins=["lr", "checkpoint", "recorder"]',
        "train.max_steps=6", "train.eval_interval=3", "train.save_interval=4", "train.log_interval=2",
        "plugin.lr.warmup_steps=1",
    )
    assert result.status == "completed" and result.step == 6
    calls = INSTANCES["recorder"].calls
    assert calls == [
        ("run_start", 0),
        ("step", 1), ("step", 2), ("step", 3), ("notice", 3), ("eval", 3), ("eval", 3),
        ("step", 4), ("notice", 4), ("save", 4), ("step", 5), ("step", 6), ("notice", 6), ("eval", 6), ("eval", 6),
        ("notice", 6), ("save", 6), ("run_end", 6),
    ]
    # the kernel announces evaluations and saves before doing them (for status observers)
    announced = [(e.kind, e.step) for e in INSTANCES["recorder"].events if type(e).__name__ == "Notice"]
    assert announced == [("evaluating", 3), ("saving", 4), ("evaluating", 6), ("saving", 6)]
    steps = [e for e in INSTANCES["recorder"].events if type(e).__name__ == "StepEnd"]
    assert [s.logged for s in steps] == [False, True, False, True, False, True]
    assert steps[1].loss == pytest.approx(10 / 2) and steps[0].loss is None
    assert steps[-1].tokens == 48
    assert session.backend.steps == [0, 1, 2, 3, 4, 5]


def test_lr_plugin_sets_every_step(registry, tmp_path):
    session, _ = run(registry, tmp_path, 'plugins=["lr"]', "train.max_steps=5", "optim.lr=1.0",
                     "plugin.lr.warmup_steps=1", "plugin.lr.min_lr=0.0")
    lrs = session.backend.lrs
    assert lrs[0] == pytest.approx(0.5)  # warmup: (0 + 1) / (1 + 1)
    assert lrs[1] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[-1] < lrs[1]


def test_without_lr_plugin_the_base_lr_is_used(registry, tmp_path):
    session, _ = run(registry, tmp_path, "plugins=[]", "train.max_steps=3", "optim.lr=0.25")
    assert session.backend.lrs == [0.25, 0.25, 0.25]


def test_control_stop_saves_and_ends_stopped(registry, tmp_path):
    _, result = run(registry, tmp_path, 'plugins=["checkpoint", "script", "recorder"]', "train.max_steps=10",
                    "plugin.script.stop_at=[4]", "plugin.script.reason='signal'")
    assert result.status == "stopped" and result.step == 4 and result.reason == "signal"
    saves = [e for e in INSTANCES["recorder"].events if type(e).__name__ == "CheckpointSaved"]
    assert [(s.step, s.reason) for s in saves] == [(4, "signal")]
    run_end = INSTANCES["recorder"].events[-1]
    assert run_end.status == "stopped"


def test_control_failed_stop_does_not_save(registry, tmp_path):
    _, result = run(registry, tmp_path, 'plugins=["checkpoint", "script", "recorder"]', "train.max_steps=10",
                    "plugin.script.stop_at=[3]", "plugin.script.fail=true", "plugin.script.reason='guard'")
    assert result.status == "failed" and result.reason == "guard"
    assert not [c for c in INSTANCES["recorder"].calls if c[0] == "save"]


def test_control_save_and_eval_on_request(registry, tmp_path):
    _, result = run(registry, tmp_path, 'plugins=["checkpoint", "script", "recorder"]', "train.max_steps=5",
                    "train.eval_interval=0", "plugin.script.save_at=[2]", "plugin.script.eval_at=[3]",
                    "plugin.script.reason='request'")
    calls = INSTANCES["recorder"].calls
    assert ("save", 2) in calls and ("eval", 3) in calls
    saves = [e for e in INSTANCES["recorder"].events if type(e).__name__ == "CheckpointSaved"]
    assert saves[0].reason == "request"


def test_pause_polls_then_resumes(registry, tmp_path):
    _, result = run(registry, tmp_path, 'plugins=["script", "recorder"]', "train.max_steps=4",
                    "plugin.script.pause_at=[2]", "plugin.script.pause_polls=3")
    assert result.status == "completed" and result.step == 4
    notices = [e for e in INSTANCES["recorder"].events if type(e).__name__ == "Notice"]
    assert [n.kind for n in notices] == ["script", "paused", "resumed", "evaluating"]  # the final evaluation
    assert INSTANCES["script"].polls == 3


def test_combine_any_stop_wins_regardless_of_order():
    a = Control(pause=True)
    b = Control(stop=True, reason="signal")
    c = Control(save=True, reason="best")
    for order in ([a, b, c], [c, b, a], [b, a, c]):
        merged = combine(order)
        assert merged.stop and merged.save and not merged.pause and merged.reason == "signal"
    assert combine([a, c]) == Control(pause=True, save=True, reason="best")
    assert combine([]) == Control()


def test_observer_failure_is_reported_and_disabled(registry, tmp_path, capsys):
    _, result = run(registry, tmp_path, 'plugins=["boom", "recorder"]', "train.max_steps=6",
                    "train.plugin_max_failures=2")
    assert result.status == "completed"
    err = capsys.readouterr().err
    assert err.count("plugin 'boom' failed in trainctl_step_end") == 1
    assert "plugin 'boom' disabled after 2 failures" in err
    kinds = [e.kind for e in INSTANCES["recorder"].events if type(e).__name__ == "Notice" and e.kind != "evaluating"]
    assert kinds == ["plugin_error", "plugin_disabled"]
    assert [c for c in INSTANCES["recorder"].calls if c[0] == "step"][-1] == ("step", 6)


def test_critical_failure_fails_the_run_with_its_name(registry, tmp_path):
    _, result = run(registry, tmp_path, 'plugins=["critical_boom", "recorder"]', "train.max_steps=6")
    assert result.status == "failed" and result.step == 1
    assert "critical_boom" in result.reason and "observer exploded" in result.reason
    assert INSTANCES["recorder"].calls[-1][0] == "run_end"


def test_backend_failure_fails_the_run_and_run_end_fires(registry, tmp_path):
    config = make_config(registry, tmp_path / "out", 'plugins=["recorder", "jsonl"]', "train.max_steps=6",
                         "train.log_interval=1")
    session = Run(config, registry, resume="never")
    session.backend.fail_at = 3
    result = session.fit()
    assert result.status == "failed" and result.reason == "RuntimeError: boom"
    lines = [json.loads(l) for l in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "run_end" and lines[-1]["status"] == "failed" and lines[-1]["step"] == 3


def test_resume_continues_from_the_checkpoint(registry, tmp_path):
    _, first = run(registry, tmp_path, 'plugins=["checkpoint", "script"]', "train.max_steps=10",
                   "plugin.script.stop_at=[4]")
    assert first.step == 4
    session, second = run(registry, tmp_path, 'plugins=["checkpoint", "recorder"]', "train.max_steps=10",
                          resume="auto")
    assert session.resumed_from.endswith("step-000004")
    assert session.backend.steps == list(range(4, 10))
    assert float(session.backend.weight) == 10.0  # 4 restored + 6 new
    assert INSTANCES["recorder"].calls[0] == ("run_start", 4)



def test_step_times_are_each_steps_own_and_rates_are_measured_over_the_interval(registry, tmp_path):
    import dataclasses

    session = Run(make_config(registry, tmp_path / "out", 'plugins=["recorder"]', "train.max_steps=6",
                              "train.log_interval=3"), registry, resume="never")
    session.plan = dataclasses.replace(session.plan, tokens_per_step=1000)  # an estimate the steps do not meet
    assert session.fit().status == "completed"
    fake_tokens = 8  # the fake backend trains 8 tokens a step
    steps = [e for e in INSTANCES["recorder"].events if type(e).__name__ == "StepEnd"]
    first, second = steps[:3], steps[3:]
    for interval in (first, second):
        seconds = sum(e.step_time for e in interval)
        logged = interval[-1]
        assert logged.logged and logged.mean_step_time == pytest.approx(seconds / 3)
        # tokens trained in the interval over its time, not the plan's tokens per step
        assert logged.tokens_per_s == pytest.approx(3 * fake_tokens / seconds)
        assert all(e.tokens_per_s is None and e.skipped_updates is None for e in interval[:-1])
    assert first[1].mean_step_time == pytest.approx((first[0].step_time + first[1].step_time) / 2)
    assert [e.metrics for e in steps if e.logged] == [{}, {}]  # no fixed outputs among the metrics
