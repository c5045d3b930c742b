"""A third-party plugin package, installed through the ``trainctl.plugins`` entry point, meets
the contract through the real CLI: a misspelled hook and a hook wrapper are refused before
training (exit 2, one line), and a notice of a kind it did not declare is refused where it is
sent, as a failure of that plugin, while the kinds it declared reach the loggers; an eval metric
(``trainctl_eval_metrics``) reaches the eval events and the console, and one that raises is one
line naming it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_GPT, run_cli
from tests.installed_dist import install

MODULE = '''
import time
from trainctl.hooks import NoticeKind, PluginSpec, hookimpl
from trainctl.hooks.events import Notice

FOUND = NoticeKind(name="x.found", sender="declared", when="it saw a step", data={"step": "int: the step"})


class Typo:
    def __init__(self, config, run): pass

    @hookimpl
    def trainctl_step_ended(self, event): print("never called")


class Wrapper:
    def __init__(self, config, run): pass

    @hookimpl(wrapper=True)
    def trainctl_lr(self, step, base_lr):
        lr = yield
        return lr


class Chatty:
    def __init__(self, config, run): self.run = run

    @hookimpl
    def trainctl_step_end(self, event):
        self.run.emit(Notice(step=event.step, kind="chatty_step", time=time.time()))


class Declared:
    def __init__(self, config, run): self.run = run

    @hookimpl
    def trainctl_step_end(self, event):
        self.run.emit(Notice(step=event.step, kind="x.found", data={"step": event.step}, time=time.time()))


class Scored:
    def __init__(self, config, run): pass

    @hookimpl
    def trainctl_eval_metrics(self, split, logits, targets):
        return {"x.scored_per_batch": ((targets >= 0).sum(), logits.new_tensor(1))}


class Broken:
    def __init__(self, config, run): pass

    @hookimpl
    def trainctl_eval_metrics(self, split, logits, targets):
        raise ValueError("no metric today")


@hookimpl
def trainctl_register_plugins(register):
    register(PluginSpec(name="scored", factory=Scored))
    register(PluginSpec(name="broken", factory=Broken))
    register(PluginSpec(name="typo", factory=Typo))
    register(PluginSpec(name="wrapper", factory=Wrapper))
    register(PluginSpec(name="chatty", factory=Chatty))
    register(PluginSpec(name="declared", factory=Declared, notices=(FOUND,)))
'''


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """``x`` 0.1 installed the way pip leaves it: a module and its dist-info, on the path."""
    site = install(tmp_path / "site", "x", {"x": "x_plugins", "x_typo": "x_typo"}, {
        "x_plugins": MODULE,
        # a registry hook misspelled: it would never register anything
        "x_typo": "from trainctl.hooks import hookimpl\n\n@hookimpl\ndef trainctl_register_plugin(register): pass\n",
    })
    monkeypatch.setenv("PYTHONPATH", str(site))  # cli_env puts the repository in front
    return site


def train(out, plugins: list[str], *sets: str):
    args = [*TINY_GPT, "train.max_steps=4", "train.log_interval=2", "train.eval_interval=0", "train.eval_steps=1",
            "train.threads=1", f"plugins={json.dumps(plugins)}", *sets]
    return run_cli("run", "--yes", "--out", str(out), *[a for item in args for a in ("--set", item)], timeout=240)


def test_the_package_is_listed_and_a_misspelled_registry_hook_is_shown(installed):
    proc = run_cli("plugins", check=True)
    for name in ("typo", "wrapper", "chatty", "declared"):
        assert name in proc.stdout
    broken = next(line for line in proc.stdout.splitlines() if line.startswith("x_typo "))
    assert broken.endswith("(failed to load: x: module x_typo implements unknown hook trainctl_register_plugin; "
                           "did you mean trainctl_register_plugins?)")


def test_a_misspelled_hook_is_a_config_error_with_the_real_hook(installed, tmp_path):
    proc = train(tmp_path / "out", ["typo", "console"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "trainctl: error: plugin 'typo' implements unknown hook trainctl_step_ended; did you mean trainctl_step_end?"
    )
    assert "never called" not in proc.stdout and not (tmp_path / "out" / "checkpoints").exists()


def test_a_hook_wrapper_is_refused_in_one_line(installed, tmp_path):
    proc = train(tmp_path / "out", ["wrapper", "console"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("trainctl: error: plugin 'wrapper' implements trainctl_lr as a hook wrapper")
    assert "drop wrapper=True" in lines[0]


def test_an_undeclared_notice_fails_its_sender_and_a_declared_one_is_logged(installed, tmp_path):
    out = tmp_path / "out"
    proc = train(out, ["chatty", "declared", "jsonl"], "train.plugin_max_failures=2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(
        "trainctl: plugin 'chatty' failed in trainctl_step_end: UndeclaredNotice: notice kind 'chatty_step' is not declared"
    ) == 1
    assert "PluginSpec(notices=" in proc.stderr
    assert "trainctl: plugin 'chatty' disabled after 2 failures" in proc.stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    notices = [(e["kind"], e.get("data", {}).get("plugin") or e.get("data", {}).get("step")) for e in events
               if e["event"] == "notice" and e["kind"] not in ("evaluating", "saving")]
    assert ("plugin_error", "chatty") in notices and ("plugin_disabled", "chatty") in notices
    assert [step for kind, step in notices if kind == "x.found"] == [1, 2, 3, 4]
    assert "chatty_step" not in {kind for kind, _ in notices}
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "completed"


def test_an_eval_metric_reaches_the_events_and_a_raising_one_is_one_line(installed, tmp_path):
    out = tmp_path / "out"
    proc = train(out, ["scored", "broken", "console", "jsonl"])
    assert proc.returncode == 0, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "broken" in line]
    assert failed == ["trainctl: plugin 'broken' failed in trainctl_eval_metrics: ValueError: no metric today"]
    assert "Traceback" not in proc.stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert {e["split"] for e in evals} == {"train", "val"}
    assert all(e["metrics"]["x.scored_per_batch"] == 8 * 32 for e in evals)  # batch_size x block_size, one batch
    assert '"x.scored_per_batch": 256.0' in next(line for line in proc.stdout.splitlines() if '"event": "eval"' in line)
