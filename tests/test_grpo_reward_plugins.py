"""Rewards as plugins (``trainctl_reward``), from a third-party package installed through the
``trainctl.plugins`` entry point, through the real CLI: an enabled plugin named in
``hf.grpo.rewards`` scores each generation (alone: another reward plugin enabled beside it is not
asked), combined with a function reward by ``reward_weights``; one that raises, answers None or
the wrong number of values is one line naming the plugin (exit 2); a name no enabled plugin
answers is refused before the model loads. A GRPO checkpoint whose config names a reward module
is evaluated by ``trainctl eval`` and the eval worker without that module ever being imported."""

from __future__ import annotations

import json

import pytest

from tests import hf_assets
from tests.conftest import run_cli
from tests.installed_dist import install
from tests.worker_process import Worker

MODULE = '''
import os
from trainctl.hooks import PluginSpec, hookimpl


def text(completion):
    return completion[-1]["content"] if isinstance(completion, list) else completion


class Length:
    """A tenth of a completion's characters; every row must carry its dataset columns."""

    def __init__(self, config, run): pass

    @hookimpl
    def trainctl_reward(self, prompts, completions, rows):
        assert len(prompts) == len(completions) == len(rows) and all("answer" in row for row in rows)
        return [len(text(c)) / 10 for c in completions]


class Other:
    def __init__(self, config, run): pass

    @hookimpl
    def trainctl_reward(self, prompts, completions, rows):
        raise AssertionError("asked though hf.grpo.rewards does not name it")


class Down:
    def __init__(self, config, run): pass

    @hookimpl
    def trainctl_reward(self, prompts, completions, rows):
        raise RuntimeError("the grader is down")


class Short:
    def __init__(self, config, run): pass

    @hookimpl
    def trainctl_reward(self, prompts, completions, rows):
        return [1.0] * (len(completions) - 1)


class Silent:
    def __init__(self, config, run): pass

    @hookimpl
    def trainctl_reward(self, prompts, completions, rows):
        return None


@hookimpl
def trainctl_register_plugins(register):
    for name, factory in (("length", Length), ("other", Other), ("down", Down), ("short", Short), ("silent", Silent)):
        register(PluginSpec(name=name, factory=factory, description="a reward"))
'''

#: a reward function whose module leaves a mark when it is imported
MARKED = '''
import os
open(os.environ["XR_MARK"], "a").write("imported\\n")


def score(prompts, completions, rows):
    return [0.5] * len(completions)
'''


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """``xr`` 0.1 installed the way pip leaves it: a module and its dist-info, on the path."""
    site = install(tmp_path / "site", "xr", {"xr": "xr_rewards"}, {"xr_rewards": MODULE, "xr_marked": MARKED})
    monkeypatch.setenv("PYTHONPATH", str(site))  # cli_env puts the repository in front
    monkeypatch.setenv("XR_MARK", str(tmp_path / "imported"))
    return site


@pytest.fixture(scope="module")
def prompts(hf, tmp_path_factory):
    rows = [{"prompt": speech[:40], "answer": speaker} for speaker, speech in hf_assets.speeches(16)]
    return hf_assets.write_jsonl(tmp_path_factory.mktemp("reward_plugins") / "prompts.jsonl", rows)


def grpo(hf, out, data, plugins: list[str], rewards: list[str], *extra: str):
    sets = hf.sets(data, 'hf.objective="grpo"', "train.max_steps=2", "train.eval_interval=0", "data.val_fraction=0",
                   "hf.grpo.num_generations=4", "hf.grpo.max_completion_length=4", f"plugins={json.dumps(['defaults', *plugins])}",
                   f"hf.grpo.rewards={json.dumps(rewards)}", *extra)
    return run_cli("run", "--yes", "--backend", "hf", "--out", str(out), *[a for item in sets for a in ("--set", item)],
                   timeout=300)


def one_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    return line


def test_a_plugin_reward_trains_weighed_with_a_function_reward(installed, hf, prompts, tmp_path):
    out = tmp_path / "out"
    proc = grpo(hf, out, prompts, ["other", "length"], ["length", "tests.grpo_rewards:e_share"],
                "hf.grpo.reward_weights=[1.0, 0.5]", "train.log_interval=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps = [e["metrics"] for e in events if e["event"] == "step"]
    assert len(steps) == 2
    first = steps[0]
    assert first["rewards/length/mean"] > 0  # the plugin's reward, under its name
    assert first["reward"] == pytest.approx(first["rewards/length/mean"] + 0.5 * first["rewards/tests.grpo_rewards:e_share/mean"])
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "completed"


@pytest.mark.parametrize("plugin, expected", [
    ("down", "reward plugin 'down' raised RuntimeError: the grader is down; fix the plugin"),
    ("short", "reward plugin 'short' returned 7 values for 8 completions; it must return one float per completion"),
    ("silent", "reward plugin 'silent' returned nothing for 8 completions; it must return one float per completion"),
])
def test_a_plugin_reward_that_fails_is_one_line_naming_it(installed, hf, prompts, tmp_path, plugin, expected):
    line = one_line(grpo(hf, tmp_path / "out", prompts, [plugin], [plugin], "train.plugin_max_failures=5"))
    assert line == f"trainctl: error: {expected}", line


def test_a_reward_plugin_must_be_enabled(installed, hf, prompts, tmp_path):
    line = one_line(grpo(hf, tmp_path / "out", prompts, ["other"], ["length"]))
    assert "unknown reward 'length'" in line and "(enabled: other; add it to plugins)" in line, line


def test_evaluating_a_grpo_checkpoint_imports_no_reward(installed, hf, prompts, tmp_path):
    """The checkpoint's config names ``xr_marked:score``: training imports it (the mark), then
    neither ``trainctl eval`` nor the eval worker's job does, whether the evaluation succeeds."""
    out = hf.root / "run-grpo-eval"  # beside the tiny model and data: one root holds them all
    proc = grpo(hf, out, prompts, [], ["xr_marked:score"], "train.max_steps=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mark = tmp_path / "imported"
    assert mark.read_text() == "imported\n"  # the training run imported the reward
    mark.unlink()
    [ckpt] = (out / "checkpoints").iterdir()
    local = run_cli("eval", str(ckpt), "--json")
    assert "xr_marked" not in local.stdout + local.stderr, local.stdout + local.stderr
    worker = Worker(tmp_path / "state", [hf.root, prompts.parent]).start()
    try:
        status, job, _ = worker.request("POST", "/jobs", {"run": "grpo", "checkpoint": str(ckpt), "step": 1})
        assert status == 201, job
        done = worker.wait_job(job["id"], timeout=240)
        assert done["status"] in ("done", "error") and "xr_marked" not in json.dumps(done), done
    finally:
        worker.stop()
    assert not mark.exists()  # never imported
