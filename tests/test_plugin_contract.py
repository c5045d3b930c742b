"""The plugin contract, checked on every built-in plugin from the registry.

- its config is a frozen, keyword-only, slotted dataclass that mirrors its TOML table (the
  resolved table written as TOML and read back gives the same config), and an unknown key is a
  one-line config error with a suggestion, through the kernel's config loading;
- it survives every event in every run state: run_start, then in each of ``running``,
  ``paused`` and ``ending`` a logged and a plain step_end, local and remote eval_end,
  checkpoint_saved, a notice of every declared kind and trainctl_control, then run_end. The
  plugin is registered as critical, so any exception fails the test with its name and hook;
- its state_dict survives JSON: dumped, loaded into a fresh instance, the same state comes back.

Plugins with optional packages (tensorboard, wandb offline) and network plugins (prometheus on
port 0, remote_eval and notify pointed at a closed loopback port) are included.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import tomllib

import pytest

from tests.conftest import make_config
from trainctl.hooks import RunInfo, notices
from trainctl.hooks.events import CheckpointSaved, EvalEnd, Notice, RunEnd, RunStart, RunView, StepEnd
from trainctl.kernel.bus import EventBus
from trainctl.kernel.config import dump_toml
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.registry import Registry, new_plugin_manager
from trainctl.kernel.schema import as_table, build

BUILTIN = sorted(name for name, spec in Registry.discover(entry_points=False).plugins.items() if spec.source == "builtin")
STATES = ("running", "paused", "ending")
MAX_STEPS = 10


def closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tables() -> dict[str, dict]:
    dead = f"http://127.0.0.1:{closed_port()}"
    return {
        "prometheus": {"port": 0},
        "remote_eval": {"url": dead, "timeout_s": 0.5, "poll_s": 0.05, "backoff_max_s": 0.1, "wait_at_end_s": 0.2,
                        "prompts": ["A"]},
        "notify": {"url": f"{dead}/hook", "timeout_s": 1.0},
        "wandb": {"mode": "offline", "project": "contract"},
        "samples": {"every": 1, "max_new_tokens": 4},
        "layer_stats": {"every": 1},
        "status": {"interval": 0.01},
        "loss_guard": {"spike_min_history": 2},
    }


#: What each declared notice kind carries, as its senders fill it.
EXAMPLES: dict[str, dict] = {
    notices.EVALUATING: {}, notices.CONFIG_WARNING: {}, notices.SAVING: {}, notices.PAUSED: {}, notices.RESUMED: {"paused_s": 1.5},
    notices.RECOVERY: {"restarts": 1, "last_step": 45, "last_step_source": "events", "down_s": 1.0, "process_start_s": 2.0,
                       "rendezvous_s": 0.5, "setup_s": 0.5, "checkpoint_load_s": 0.1, "first_step_s": 0.1, "total_s": 4.2},
    notices.STALE_BATCH_DROPPED: {"policy_version": 3, "staleness": 2, "max_staleness": 1, "dropped": 1},
    notices.ROLLOUT_WAITING: {"workers_up": 0, "workers": 1},
    notices.PLUGIN_ERROR: {"plugin": "x", "failures": 1}, notices.PLUGIN_DISABLED: {"plugin": "x", "failures": 3},
    notices.CONTROL: {"command": "save", "id": "abc"}, notices.CHECKPOINT_CORRUPT: {"path": "/nowhere", "problem": "bad"},
    notices.SAMPLES: {"prompts": ["A"], "texts": ["bc"]},
    notices.LAYER_STATS: {"layer.0.weight_norm": 1.0, "layer.0.grad_norm": 0.5, "head.weight_norm": 2.0},
    notices.LOSS_SPIKE: {"loss": 9.0, "threshold": 3.0}, notices.SKIPPED_UPDATE: {"new": 1, "total": 2},
    notices.METRICS: {"address": "http://127.0.0.1:1/metrics"}, notices.METRICS_UNAVAILABLE: {"error": "in use"},
    notices.REMOTE_EVAL_SAMPLES: {"samples": [{"prompt": "A", "text": "bc"}]},
    notices.REMOTE_EVAL_PENDING: {"steps": [5], "outbox": "/nowhere"},
    notices.REMOTE_EVAL_UNAVAILABLE: {}, notices.REMOTE_EVAL_REACHABLE: {}, notices.REMOTE_EVAL_ERROR: {},
    notices.NOTIFY_FAILED: {},
}


@pytest.fixture
def quiet_env(tmp_path, monkeypatch):
    """Keep what plugins write under tmp_path (wandb sets its directories with setdefault)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR",
                "TRAINCTL_NOTIFY_URL", "TRAINCTL_EVAL_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def config_of(registry, tmp_path, name: str):
    sets = [f"plugin.{name}.{key}={json.dumps(value)}" for key, value in tables().get(name, {}).items()]
    return make_config(registry, tmp_path / "out", f'plugins=["{name}"]', *sets).plugin[name]


def build_plugin(registry, name: str, config, out_dir) -> tuple[EventBus, object]:
    bus = EventBus(new_plugin_manager())
    info = RunInfo(
        run_name="contract", backend="fake", out_dir=out_dir, max_steps=MAX_STEPS, emit=bus.emit,
        generate=lambda prompt, **kw: prompt + " and more",
        layer_stats=lambda: {"layer.0.weight_norm": 1.0, "layer.0.grad_norm": 0.5},
    )
    spec = registry.plugin(name)
    plugin = spec.factory(config, info)
    bus.register(dataclasses.replace(spec, critical=True), plugin)  # any exception fails the test
    return bus, plugin


def test_every_builtin_is_covered():
    assert len(BUILTIN) >= 16 and {"lr", "checkpoint", "prometheus", "wandb", "tensorboard", "notify"} <= set(BUILTIN)
    assert set(EXAMPLES) == set(notices.BUILTIN)
    for kind, data in EXAMPLES.items():
        declared = notices.BUILTIN[kind].data
        assert "*" in declared or set(data) <= set(declared), kind


@pytest.mark.parametrize("name", BUILTIN)
def test_config_is_a_frozen_keyword_only_slotted_dataclass_mirroring_its_table(registry, tmp_path, name):
    cls = registry.plugin(name).config
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, f"{name}: frozen dataclass"
    assert "__slots__" in vars(cls), f"{name}: slots=True"
    assert all(f.kw_only for f in dataclasses.fields(cls)), f"{name}: kw_only=True"
    config = config_of(registry, tmp_path, name)
    assert isinstance(config, cls)
    table = as_table(config)
    assert list(table) == [f.name for f in dataclasses.fields(cls)]
    reread = tomllib.loads(dump_toml({"plugin": {name: table}}))["plugin"].get(name, {})
    assert build(cls, reread, f"plugin.{name}") == config  # the table says everything the config holds


@pytest.mark.parametrize("name", BUILTIN)
def test_unknown_keys_are_rejected_with_a_suggestion(registry, tmp_path, name):
    fields = [f.name for f in dataclasses.fields(registry.plugin(name).config)]
    typo = (fields[0][:-1] if len(fields[0]) > 3 else fields[0] + "x") if fields else "anything"
    with pytest.raises(ConfigError) as info:
        make_config(registry, tmp_path / "out", f'plugins=["{name}"]', f"plugin.{name}.{typo}=1")
    message = str(info.value)
    assert "\n" not in message and f"unknown key 'plugin.{name}.{typo}'" in message
    if fields:
        assert f"did you mean '{fields[0]}'" in message


def fire_everything(bus: EventBus, state: str, step: int, out_dir) -> None:
    """Every event a plugin can receive, as the loop sends it in ``state``."""
    now = time.time()
    bus.step = step
    for logged in (False, True):
        bus.step_end(StepEnd(step=step, max_steps=MAX_STEPS, lr=1e-3, tokens=step * 64, step_time=0.01, logged=logged,
                             loss=2.0 + step / 10 if logged else None, grad_norm=1.0 if logged else None,
                             tokens_per_s=6400.0 if logged else None,
                             metrics={"skipped_updates": 0.0, "skip_streak_max": 0.0} if logged else {}, time=now))
        bus.deliver_pending()
    for source in ("local", "remote"):
        for split in ("train", "val"):
            bus.eval_end(EvalEnd(step=step, split=split, loss=2.0, source=source, duration=0.1,
                                 metrics={"perplexity": 7.4} if source == "remote" else {}, time=now))
    checkpoint = out_dir / "checkpoints" / f"step-{step:06d}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    bus.checkpoint_saved(CheckpointSaved(step=step, path=str(checkpoint), reason="interval", duration=0.1, val_loss=2.0,
                                         time=now))
    for kind, data in EXAMPLES.items():
        bus.notice(Notice(step=step, kind=kind, message=f"a {kind} notice", data=data, time=now))
    bus.control(RunView(step=step, max_steps=MAX_STEPS, state=state, last_loss=2.0, last_val_loss=2.0,
                        evaluated=False, time=now))
    bus.deliver_pending()


@pytest.mark.parametrize("name", BUILTIN)
def test_survives_every_event_in_every_state_and_its_state_survives_json(registry, tmp_path, quiet_env, name):
    config = config_of(registry, tmp_path, name)
    out = tmp_path / "out"
    out.mkdir()  # the kernel makes it before any plugin is built
    bus, _ = build_plugin(registry, name, config, out)
    bus.load_state_dict({})
    bus.run_start(RunStart(run_name="contract", backend="fake", out_dir=str(out), start_step=0, max_steps=MAX_STEPS,
                           params=1000, tokens_per_step=64, time=time.time()))
    bus.deliver_pending()
    for i, state in enumerate(STATES):
        fire_everything(bus, state, 3 * (i + 1), out)
    saved = bus.state_dict()
    bus.run_end(RunEnd(status="completed", step=MAX_STEPS, tokens=640, duration=1.0, train_loss=2.0, val_loss=2.0,
                       time=time.time()))

    restored = json.loads(json.dumps(saved))  # plain JSON values only
    assert restored == saved
    fresh, _ = build_plugin(registry, name, config, out)  # a resume: the same run directory
    fresh.load_state_dict(restored)
    assert fresh.state_dict() == restored
    fresh.run_end(RunEnd(status="stopped", step=0, tokens=0, duration=0.0, time=time.time()))  # releases it
