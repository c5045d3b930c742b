"""How a Run is assembled: backends get only the step keys of [train], plugins reach the backend
through calls bound once it exists, and a critical plugin that refuses its saved state is one
clear error."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests import fake_backend
from tests.conftest import make_config
from trainctl.hooks import PluginSpec, RunInfo, hookimpl
from trainctl.kernel.backend import StepConfig
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.registry import Registry
from trainctl.kernel.run import BackendCalls, Run


STRICT: list[Strict] = []


class Strict:
    """A critical plugin whose saved state must be an int; it asks the backend for text as soon
    as the run starts, through RunInfo.generate."""

    def __init__(self, config, run: RunInfo) -> None:
        self.run = run
        self.generated: str | None = None
        STRICT.append(self)

    @hookimpl
    def trainctl_run_start(self, event) -> None:
        self.generated = self.run.generate("abc")

    @hookimpl
    def trainctl_state_dict(self):
        return {"strict": 1}

    @hookimpl
    def trainctl_load_state_dict(self, states) -> None:
        if type(states.get("strict")) is not int:
            raise ValueError(f"strict state {states.get('strict')!r} is not an int")


class StrictModule:
    @hookimpl
    def trainctl_register_plugins(self, register):
        register(PluginSpec(name="strict", factory=Strict, critical=True, description="test"))


@pytest.fixture(scope="module")
def strict_registry() -> Registry:
    registry = Registry.discover(entry_points=False)
    registry.add_module(fake_backend, source="tests")
    registry.add_module(StrictModule(), source="tests")
    return registry


def test_backends_get_the_step_keys_and_plugins_the_bound_backend(strict_registry, tmp_path):
    config = make_config(strict_registry, tmp_path / "out", 'plugins=["strict", "checkpoint"]', "train.max_steps=2",
                         "train.batch_size=3", "train.grad_clip=0.5")
    session = Run(config, strict_registry, resume="never")
    step = session.backend.ctx.train
    assert type(step) is StepConfig and not hasattr(step, "save_interval") and not hasattr(step, "out_dir")
    assert (step.batch_size, step.grad_clip, step.max_steps) == (3, 0.5, 2)
    assert dataclasses.asdict(step) == {f.name: getattr(config.train, f.name) for f in dataclasses.fields(StepConfig)}
    assert session.fit().status == "completed"
    assert STRICT[-1].generated == "cba"  # the fake backend's generate, reached through RunInfo


def test_backend_calls_before_the_backend_exists_say_so():
    calls = BackendCalls()
    with pytest.raises(RuntimeError, match="the backend does not exist yet"):
        calls.generate("abc")
    calls.bind(fake_backend.FakeBackend(ctx=None))
    assert calls.generate("abc", max_new_tokens=1) == "cba"


def test_a_critical_plugin_refusing_its_saved_state_is_one_config_error(strict_registry, tmp_path):
    out = tmp_path / "out"
    plugins = 'plugins=["strict", "checkpoint"]'
    Run(make_config(strict_registry, out, plugins, "train.max_steps=2"), strict_registry, resume="never").fit()
    ckpt = out / "checkpoints" / "step-000002"
    from tests.test_crafted_checkpoints import rewrite

    rewrite(ckpt, "plugins.json", json.dumps({"strict": "junk", "checkpoint": {}}).encode())
    with pytest.raises(ConfigError) as error:
        Run(make_config(strict_registry, out, plugins, "train.max_steps=3"), strict_registry, resume="auto")
    message = str(error.value)
    assert message.startswith(f"cannot resume from {ckpt}: plugins.json: plugin 'strict' failed in trainctl_load_state_dict: "
                              "ValueError: strict state 'junk' is not an int; ")
    assert "\n" not in message
