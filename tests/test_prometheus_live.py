"""A live ``gpt`` run (the real CLI in a subprocess) with the prometheus plugin: its endpoint
scraped over HTTP, and a real Prometheus server scraping it that must answer every PromQL
expression of the Grafana dashboard (configs/grafana/trainctl.json).

The dashboard's DPO row reads the generic step/eval metric series by TRL's names. A second run
beside the gpt run feeds them: a third-party backend, installed through the entry point like any
other, whose steps report ``rewards/accuracies``, ``logps/chosen``... in ``StepOutput.metrics``.
Nothing in the prometheus plugin knows those names, which is the point: a real DPO run exports
them the same way. The RL row the same way: a third run, of a rollout backend (the kernel's
seam, ``trainctl.kernel.rollout``) whose steps report GRPO's metrics by TRL's names and whose
producer hands out one batch too stale to train on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_GPT, cli_env
from tests.installed_dist import install
from tests.test_prometheus import free_port, scrape, value

DASHBOARD = ROOT / "configs" / "grafana" / "trainctl.json"
ALERTS = ROOT / "configs" / "prometheus" / "alerts.yml"
RUN_NAME = "live"
# What Grafana substitutes before it sends a query; with a 1 s scrape interval a 10 s window
# holds enough samples for rate().
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$run": RUN_NAME}


DPO_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")
PREFERENCE_BACKEND = '''
import time

import torch

from tests.fake_backend import FakeBackend, FakeDataConfig, FakeModelConfig
from trainctl.hooks import BackendSpec, hookimpl
from trainctl.kernel.backend import Evaluation, StepOutput


class PreferenceMetrics(FakeBackend):
    """Steps that report what a DPO objective reports, by TRL's names; an evaluation whose
    accuracy is the reward accuracy."""

    def train_step(self, step):
        time.sleep(0.05)  # a step's pace, not a busy loop beside the gpt run
        out = super().train_step(step)
        chosen, rejected = torch.tensor(0.1 * step), torch.tensor(-0.1 * step)
        return StepOutput(loss=out.loss, grad_norm=out.grad_norm, tokens=out.tokens, metrics={
            "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": torch.tensor(0.75), "logps/chosen": torch.tensor(-20.0),
            "logps/rejected": torch.tensor(-25.0)})

    def evaluate(self, step):
        return {"val": Evaluation(loss=0.6, accuracy=0.7)}


@hookimpl
def trainctl_register_backends(register):
    register(BackendSpec(name="prefmetrics", factory="pref_metrics:PreferenceMetrics",
                         model_config=FakeModelConfig, data_config=FakeDataConfig))
'''


GRPO_NAMES = ("reward", "reward_std", "completions/mean_length", "kl", "clip_ratio/region_mean")
ROLLOUT_BACKEND = '''
import time

from tests.fake_backend import FakeDataConfig, FakeRolloutBackend, FakeRolloutModelConfig
from trainctl.hooks import BackendSpec, hookimpl


class RolloutMetrics(FakeRolloutBackend):
    """Steps on a producer's rollouts that report what GRPO reports, by TRL's names."""

    def train_rollout(self, step, rollout):
        time.sleep(0.05)  # a step's pace, not a busy loop beside the other runs
        out = super().train_rollout(step, rollout)
        out.host_metrics = {"reward": 0.25 + 0.001 * step, "reward_std": 0.1, "completions/mean_length": 12.0,
                            "kl": 0.01, "clip_ratio/region_mean": 0.05}
        return out


@hookimpl
def trainctl_register_backends(register):
    register(BackendSpec(name="rlmetrics", factory="rl_metrics:RolloutMetrics",
                         model_config=FakeRolloutModelConfig, data_config=FakeDataConfig))
'''


def install_backends(site: Path) -> Path:
    """The backends above installed the way pip leaves a package: modules and their dist-info."""
    return install(site, "metric_backends", {"pref_metrics": "pref_metrics", "rl_metrics": "rl_metrics"},
                   {"pref_metrics": PREFERENCE_BACKEND, "rl_metrics": ROLLOUT_BACKEND})


def start_backend_run(out: Path, port: int, site: Path, backend: str, *extra: str) -> subprocess.Popen:
    """The same run name as the gpt run: the dashboard's $run picks all, the backend label tells them apart."""
    sets = [f"backend='{backend}'", "train.max_steps=100000", "train.log_interval=2", "train.eval_interval=10",
            "train.save_interval=0", "train.device='cpu'", "train.threads=1", f"train.run_name='{RUN_NAME}'",
            f"plugin.prometheus.port={port}", 'plugins=["prometheus"]', *extra]
    args = [sys.executable, "-m", "trainctl", "run", "--yes", "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    env = cli_env()
    env["PYTHONPATH"] += os.pathsep + str(site)
    log = open(out.parent / f"{backend}.log", "w")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def start_run(out: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Long enough never to finish on its own: the test stops it."""
    sets = [*TINY_GPT, "train.max_steps=100000", "train.log_interval=5", "train.eval_interval=20",
            "train.eval_steps=2", "train.save_interval=40", "plugin.lr.warmup_steps=10",
            f"train.run_name='{RUN_NAME}'", f"plugin.prometheus.port={port}", "plugin.layer_stats.every=10",
            'plugins=["lr", "checkpoint", "prometheus", "layer_stats", "console", "jsonl"]', *extra]
    args = [sys.executable, "-m", "trainctl", "run", "--yes", "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    log = open(out.parent / "run.log", "w")
    return subprocess.Popen(args, cwd=ROOT, env=cli_env() | (env or {}), stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def address_from_events(out: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    events = out / "events.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, (out.parent / "run.log").read_text()
        if events.exists():
            for line in events.read_text().splitlines():
                record = json.loads(line)
                if record["event"] == "notice" and record["kind"] == "metrics":
                    return record["data"]["address"]
        time.sleep(0.2)
    raise AssertionError("the run never reported its metrics address")


def test_live_run_endpoint_over_http(tmp_path):
    out = tmp_path / "run"
    proc = start_run(out, 0)  # port 0: a free port, reported in events.jsonl
    try:
        url = address_from_events(out, proc)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)
        deadline, first = time.monotonic() + 40, None
        while time.monotonic() < deadline:
            samples = scrape(url)
            if "trainctl_train_loss" in samples:  # a logged step happened
                if first is None:
                    first = samples
                elif value(samples, "trainctl_step") > value(first, "trainctl_step"):
                    break
            time.sleep(0.3)
        else:
            raise AssertionError("the step never advanced on /metrics")
        labels = {"run": RUN_NAME, "backend": "gpt", "rank": "0"}
        # the scrape may land in an evaluation or a save between steps: exactly one state is set
        states = {s: value(samples, "trainctl_run_state", state=s, **labels) for s in ("running", "evaluating", "saving")}
        assert sorted(states.values()) == [0, 0, 1], states
        # the scrape may land inside the plugin's step hook, which sets the step last
        step = value(samples, "trainctl_step")
        assert value(samples, "trainctl_tokens_total") in (step * 8 * 32, (step + 1) * 8 * 32)
        assert value(samples, "trainctl_step_duration_seconds_count") in (step, step + 1)
        assert 0 < value(samples, "trainctl_train_loss") < 10 and value(samples, "trainctl_learning_rate") > 0
        assert time.time() - value(samples, "trainctl_last_step_timestamp_seconds") < 30
        promtool = shutil.which("promtool")
        if promtool:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read()
            check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
            assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
    finally:
        stop(proc)


def test_a_restarted_run_serves_its_restarts_and_its_recovery_time(tmp_path):
    """Started again the way torchrun (2nd restart) inside a requeued SLURM job (1st requeue)
    starts it: /metrics says 3 restarts and where the time since the last step went."""
    out = tmp_path / "run"
    first = start_run(out, 0)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoints").is_dir() or not any((out / "checkpoints").glob("step-*")):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.2)
    finally:
        first.kill()  # a fault: no run end, no final checkpoint
        first.wait()
    before = (out / "events.jsonl").read_text().count("\n")
    proc = start_run(out, 0, env={"TORCHELASTIC_RESTART_COUNT": "2", "SLURM_RESTART_COUNT": "1"})
    try:
        deadline, samples = time.monotonic() + 60, {}
        while "trainctl_recovery_seconds" not in samples:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            records = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()[before:]]
            urls = [r["data"]["address"] for r in records if r["event"] == "notice" and r["kind"] == "metrics"]
            samples = scrape(urls[0]) if urls else {}
            time.sleep(0.2)
        labels = {"run": RUN_NAME, "backend": "gpt", "rank": "0"}
        assert value(samples, "trainctl_restarts_total", **labels) == 3
        phases = {row["phase"]: v for row, v in samples["trainctl_recovery_seconds"]}
        assert set(phases) == {"down", "process_start", "rendezvous", "setup", "checkpoint_load", "first_step", "total"}
        assert min(phases.values()) >= 0 and phases.pop("total") == pytest.approx(sum(phases.values()), abs=1e-6)
    finally:
        stop(proc)


# --- a real Prometheus server ------------------------------------------------------------------


def prometheus_binary(name: str = "prometheus") -> str:
    """The binary from the Debian ``prometheus`` package; skip without it locally, fail in CI."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if found:
        return found
    why = f"the {name} binary is not installed (Debian package 'prometheus': apt-get install prometheus)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; .ci/run installs it, and in CI this test must run")
    pytest.skip(f"{why}; this test always runs in CI")


def dashboard_queries(panels: list | None = None) -> list[str]:
    """Every PromQL expression of the dashboard (or of ``panels``), with Grafana's variables substituted."""
    exprs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(json.loads(DASHBOARD.read_text()) if panels is None else panels)
    substituted = []
    for expr in exprs:
        for name, replacement in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, replacement)
        assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
        substituted.append(expr)
    return substituted


def dashboard_row(title: str) -> list[dict]:
    """The panels under the dashboard's row whose title holds ``title``, up to the next row."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and title in p["title"])
    rest = panels[start + 1:]
    return rest[:next((i for i, p in enumerate(rest) if p["type"] == "row"), len(rest))]


def test_the_dpo_row_shows_every_dpo_metric_and_the_dpo_loss():
    queries = dashboard_queries(dashboard_row("DPO"))
    for name in DPO_NAMES:
        assert any(f'name="{name}"' in q for q in queries), f"no DPO panel shows {name}"
    assert any(q.startswith("trainctl_eval_loss") for q in queries)  # the DPO validation loss
    assert any("trainctl_eval_metric" in q for q in queries)  # the validation reward accuracy


def test_the_rl_row_shows_grpo_metrics_and_every_rollout_metric():
    queries = dashboard_queries(dashboard_row("GRPO"))
    for name in GRPO_NAMES:
        assert any(f'name="{name}"' in q for q in queries), f"no RL panel shows {name}"
    for metric in ("trainctl_policy_version", "trainctl_rollout_staleness", "trainctl_rollout_tokens_total",
                   "trainctl_rollout_generation_seconds_total", "trainctl_stale_batches_dropped_total"):
        assert any(metric in q for q in queries), f"no RL panel shows {metric}"


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path):
    binary = prometheus_binary()
    queries = dashboard_queries()
    dpo_queries = set(dashboard_queries(dashboard_row("DPO")))
    rl_queries = set(dashboard_queries(dashboard_row("GRPO")))
    assert len(queries) >= 12 + 9 + 10 and len(dpo_queries) == 9 and len(rl_queries) == 10
    metrics_port, preference_port, rollout_port, web_port = free_port(), free_port(), free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{ALERTS}']\n"
        "scrape_configs:\n  - job_name: trainctl\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}', '127.0.0.1:{preference_port}', '127.0.0.1:{rollout_port}']\n"
    )
    prom_log = open(tmp_path / "prometheus.log", "w")
    prometheus = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
        stdout=prom_log, stderr=subprocess.STDOUT,
    )
    run = start_run(tmp_path / "run", metrics_port)
    site = install_backends(tmp_path / "site")
    preference = start_backend_run(tmp_path / "preference", preference_port, site, "prefmetrics")
    # one batch two versions behind at step 1, past max_staleness 1: dropped, so the drop counter exists
    rollout = start_backend_run(tmp_path / "rollout", rollout_port, site, "rlmetrics", "model.max_staleness=1",
                                "model.lag=[0, 2]")
    pending = {q: None for q in queries}
    backends: dict[str, set[str]] = {}
    try:
        deadline = time.monotonic() + 60  # the runs' startup, then up to ~20 s of scraping
        while pending and time.monotonic() < deadline:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert run.poll() is None, (tmp_path / "run.log").read_text()
            assert preference.poll() is None, (tmp_path / "prefmetrics.log").read_text()
            assert rollout.poll() is None, (tmp_path / "rlmetrics.log").read_text()
            for query in list(pending):
                try:
                    data = api(web_port, "query", query=query)
                except OSError as exc:  # prometheus still starting
                    pending[query] = exc
                    continue
                if data["result"]:
                    del pending[query]
                    backends[query] = {r["metric"].get("backend") for r in data["result"]}
                else:
                    pending[query] = data
            time.sleep(1)
        assert not pending, "dashboard queries without data:\n" + "\n".join(f"{q}  -> {r}" for q, r in pending.items())
        # the DPO row shows only the run that reports DPO metrics, though the gpt run has a loss too
        assert all(backends[q] == {"prefmetrics"} for q in dpo_queries), {q: backends[q] for q in dpo_queries}
        # (an aggregate by run has no backend label: the series under it are the rollout run's alone)
        assert all(backends[q] in ({"rlmetrics"}, {None}) for q in rl_queries), {q: backends[q] for q in rl_queries}
        for counter in ("trainctl_rollout_tokens_total", "trainctl_rollout_generation_seconds_total"):
            assert {r["metric"]["backend"] for r in api(web_port, "query", query=counter)["result"]} == {"rlmetrics"}
        reward = api(web_port, "query", query='trainctl_step_metric{name="reward_std"}')["result"]
        assert [float(r["value"][1]) for r in reward] == [0.1]
        dropped = api(web_port, "query", query="trainctl_stale_batches_dropped_total")["result"]
        assert [float(r["value"][1]) for r in dropped] == [1.0]
        accuracy = api(web_port, "query", query='trainctl_step_metric{name="rewards/accuracies"}')["result"]
        assert [float(r["value"][1]) for r in accuracy] == [0.75]  # the value, not only a series
        query = 'trainctl_eval_metric{name="accuracy", split="val", backend="prefmetrics"}'  # gpt has its own
        assert [float(r["value"][1]) for r in api(web_port, "query", query=query)["result"]] == [0.7]
        # the dashboard's run picker: label_values(trainctl_run_info, run)
        assert RUN_NAME in api(web_port, "label/run/values", **{"match[]": "trainctl_run_info"})
        rules = api(web_port, "rules")["groups"]
        assert [g["name"] for g in rules] == ["trainctl"] and len(rules[0]["rules"]) == 2
        targets = api(web_port, "targets")["activeTargets"]
        assert len(targets) == 3 and all(t["health"] == "up" for t in targets), targets
    finally:
        stop(run)
        stop(preference)
        stop(rollout)
        prometheus.terminate()
        prometheus.wait(10)


def test_without_the_binary_it_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed.*always runs in CI"):
        prometheus_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="in CI this test must run"):
        prometheus_binary()


def test_shipped_prometheus_config_and_alerts_are_valid():
    promtool = prometheus_binary("promtool")
    config = ROOT / "configs" / "prometheus" / "prometheus.yml"
    proc = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "2 rules found" in proc.stdout, proc.stdout + proc.stderr
    assert "127.0.0.1:9464" in config.read_text()  # the plugin's default address
