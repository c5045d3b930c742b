"""The hook spec documents itself, every event has a hook, and the bus has a method per hook."""

from __future__ import annotations

import dataclasses
import inspect
import sys

from trainctl.hooks import events, spec
from trainctl.kernel.bus import EventBus

HOOKS = {name: fn for name, fn in vars(spec).items() if name.startswith("trainctl_")}
EVENT_HOOKS = {
    events.RunStart: "trainctl_run_start",
    events.StepEnd: "trainctl_step_end",
    events.EvalEnd: "trainctl_eval_end",
    events.CheckpointSaved: "trainctl_checkpoint_saved",
    events.Notice: "trainctl_notice",
    events.RunEnd: "trainctl_run_end",
    events.RolloutReceived: "trainctl_rollout_received",
    events.WeightsPublished: "trainctl_weights_published",
}


def test_every_hook_is_documented():
    assert len(HOOKS) >= 16
    for name, fn in HOOKS.items():
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 40, f"{name} needs a docstring saying when it fires and what it returns"


def test_every_event_has_its_hook():
    payloads = {cls for cls in events.EVENT_NAMES}
    assert payloads == set(EVENT_HOOKS)
    for cls, hook in EVENT_HOOKS.items():
        assert hook in HOOKS
        params = list(inspect.signature(HOOKS[hook]).parameters)
        assert params == ["event"]


def test_events_are_frozen_slotted_keyword_only_plain_data():
    for cls in events.EVENT_NAMES:
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen and hasattr(cls, "__slots__"), cls
        for field in dataclasses.fields(cls):
            assert field.kw_only, f"{cls.__name__}.{field.name}"
            assert "Tensor" not in str(field.type), f"{cls.__name__}.{field.name}"


def test_bus_has_a_method_for_every_hook():
    skip = {"trainctl_register_plugins", "trainctl_register_backends", "trainctl_register_commands"}
    wanted = {name.removeprefix("trainctl_") for name in HOOKS if name not in skip}
    renamed = {"run_start", "step_end", "eval_end", "checkpoint_saved", "notice", "run_end"}
    for name in wanted:
        assert hasattr(EventBus, name), f"EventBus has no method for trainctl_{name}"
    assert renamed <= wanted

def test_the_reward_hook_says_who_calls_it_and_how_answers_combine():
    """The one hook whose answers are the training signal: its spec says it is asked per named
    plugin, what an answer must be and what a failure does, and the plugin guide points to it."""
    from trainctl import hooks

    doc = " ".join((inspect.getdoc(spec.trainctl_reward) or "").split())
    assert list(inspect.signature(spec.trainctl_reward).parameters) == ["prompts", "completions", "rows"]
    for promise in ("one finite float per completion", "named in ``hf.grpo.rewards``", "called alone",
                    "``hf.grpo.reward_weights``", "one line naming the plugin (exit 2)", "never call it"):
        assert promise in doc, promise
    assert "trainctl_reward" in (inspect.getdoc(hooks) or "")


def test_the_plugin_guide_example_runs_as_written(tmp_path, monkeypatch):
    """The complete plugin in ``trainctl/hooks/__init__.py``'s docstring, registered and run."""
    import textwrap
    import types

    from tests import fake_backend, recording_plugins
    from tests.conftest import make_config
    from trainctl import hooks
    from trainctl.kernel.registry import Registry
    from trainctl.kernel.run import Run

    guide = inspect.getdoc(hooks) or ""
    block = guide.split("A complete one::\n", 1)[1].split("\n\nMake the module available", 1)[0]
    module = types.ModuleType("stop_at_loss")
    monkeypatch.setitem(sys.modules, "stop_at_loss", module)  # dataclasses look their module up
    exec(compile(textwrap.dedent(block), "guide", "exec"), module.__dict__)  # our own docstring, in a test
    registry = Registry.discover(entry_points=False)
    for extra in (fake_backend, recording_plugins, module):
        registry.add_module(extra, source="tests")
    config = make_config(registry, tmp_path / "out", 'plugins=["stop_at_loss", "recorder"]', "train.max_steps=20",
                         "train.log_interval=2", "plugin.stop_at_loss.target=100.0", "plugin.stop_at_loss.report_every=0")
    result = Run(config, registry, resume="never").fit()
    assert result.status == "stopped" and result.step == 2  # the first logged loss is below 100
    reached = [e for e in recording_plugins.INSTANCES["recorder"].events
               if type(e).__name__ == "Notice" and e.kind == module.REACHED.name]
    assert [(n.step, set(n.data)) for n in reached] == [(2, {"loss"})]
