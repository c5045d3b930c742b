"""The prometheus plugin: metric names and types, the endpoint over real HTTP while the kernel
evaluates, saves and pauses, a busy port, ranks, and the Pushgateway push."""

from __future__ import annotations

import http.server
import math
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_config
from tests.recording_plugins import INSTANCES
from trainctl.hooks import RunInfo
from trainctl.hooks.events import CheckpointSaved, EvalEnd, Notice, RunEnd, RunStart, StepEnd
from trainctl.kernel.run import Run
from trainctl.plugins.prometheus import Config, NotServing, PrometheusExporter, make

TYPES = {
    "trainctl_step": "gauge", "trainctl_max_steps": "gauge", "trainctl_tokens": "counter",
    "trainctl_train_loss": "gauge", "trainctl_eval_loss": "gauge", "trainctl_learning_rate": "gauge",
    "trainctl_grad_norm": "gauge", "trainctl_tokens_per_second": "gauge", "trainctl_mfu_ratio": "gauge",
    "trainctl_step_duration_seconds": "histogram", "trainctl_checkpoints_saved": "counter",
    "trainctl_checkpoint_save_duration_seconds": "gauge", "trainctl_skipped_steps": "counter",
    "trainctl_run_state": "gauge", "trainctl_run_info": "gauge", "trainctl_last_step_timestamp_seconds": "gauge",
    "trainctl_layer_weight_norm": "gauge", "trainctl_layer_grad_norm": "gauge",
    "trainctl_last_success_timestamp_seconds": "gauge", "trainctl_step_metric": "gauge", "trainctl_eval_metric": "gauge",
    "trainctl_restarts": "counter", "trainctl_recovery_seconds": "gauge",
}
# name: bounded by plugin.prometheus.max_metric_names (test_metric_names_are_capped_with_one_warning)
BOUNDED_LABELS = {"run", "backend", "rank", "split", "source", "mean", "state", "layer", "version", "world_size", "le", "name",
                  "phase"}
# what a DPO backend reports on logged steps (TRL's names), and names that need sanitising
STEP_METRICS = {"rewards/accuracies": 0.75, "rewards/margins": 0.2, "logps/chosen": -30.5, "mean_token_accuracy": 0.4,
                "odd name{x=\"1\"}\n": 1.0}


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)]"""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, metric: str, /, **labels: str) -> float:
    """The one sample of ``metric`` with ``labels`` (``name=`` too: the generic series' label)."""
    matches = [v for l, v in samples.get(metric, []) if all(l.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, f"{metric}{labels}: {matches}"
    return matches[0]


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return parse(response.read().decode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def feed_run(exporter: PrometheusExporter, *, status: str = "completed") -> None:
    t = time.time()
    exporter.trainctl_run_start(RunStart(run_name="t", backend="fake", out_dir="/tmp/x", start_step=0, max_steps=4,
                                         params=10, tokens_per_step=8, time=t))
    for step in range(1, 5):
        logged = step % 2 == 0
        exporter.trainctl_step_end(StepEnd(
            step=step, max_steps=4, lr=0.1 * step, tokens=8 * step, step_time=0.02, logged=logged,
            loss=2.0 / step if logged else None, grad_norm=0.5 if logged else None,
            tokens_per_s=400.0 if logged else None, mfu=0.1 if logged else None,
            skipped=step == 4, metrics={k: v * step for k, v in STEP_METRICS.items()} if logged else {}, time=t + step))
    exporter.trainctl_eval_end(EvalEnd(step=4, split="val", loss=1.5, time=t, metrics={
        "perplexity": math.exp(1.5), "accuracy": 0.5, "rewards/accuracies": 0.625}))
    exporter.trainctl_eval_end(EvalEnd(step=4, split="val", loss=1.6, source="remote", time=t))
    exporter.trainctl_checkpoint_saved(CheckpointSaved(step=4, path="/tmp/x/checkpoints/step-000004", reason="end",
                                                       duration=0.25, time=t))
    exporter.trainctl_notice(Notice(step=4, kind="layer_stats", time=t, data={
        "layer.0.weight_norm": 3.0, "layer.0.grad_norm": 0.1, "embedding.weight_norm": 2.0, "bogus": 1.0}))
    exporter.trainctl_run_end(RunEnd(status=status, step=4, tokens=32, duration=1.0, time=t + 9))


def exporter(tmp_path: Path, **config) -> tuple[PrometheusExporter, list]:
    emitted: list = []
    info = RunInfo(run_name="t", backend="fake", out_dir=tmp_path, max_steps=4, emit=emitted.append)
    return PrometheusExporter(Config(port=0, **config), info), emitted


def test_metric_names_types_and_labels(tmp_path):
    plugin, emitted = exporter(tmp_path)
    feed_run(plugin)
    text = generate_latest(plugin.registry).decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    # prometheus_client adds a <name>_created gauge (start time) to each counter and histogram
    created = {name for name in families if name.endswith("_created")}
    assert {name.removesuffix("_created") for name in created} == {n for n, t in TYPES.items() if t != "gauge"}
    assert {n: t for n, t in families.items() if n not in created} == TYPES
    samples = parse(text)
    for name, rows in samples.items():
        for labels, _ in rows:
            assert set(labels) <= BOUNDED_LABELS, f"{name} has unbounded labels {labels}"
            assert {"run", "backend", "rank"} <= set(labels) and labels["run"] == "t" and labels["rank"] == "0"
    assert value(samples, "trainctl_step") == 4
    assert value(samples, "trainctl_tokens_total") == 32
    assert value(samples, "trainctl_train_loss") == 0.5
    assert value(samples, "trainctl_eval_loss", split="val", source="local") == 1.5
    assert value(samples, "trainctl_eval_loss", split="val", source="remote") == 1.6
    assert value(samples, "trainctl_learning_rate") == pytest.approx(0.4)
    assert value(samples, "trainctl_checkpoints_saved_total") == 1
    assert value(samples, "trainctl_checkpoint_save_duration_seconds") == 0.25
    assert value(samples, "trainctl_skipped_steps_total") == 1
    assert value(samples, "trainctl_step_duration_seconds_count") == 4
    assert value(samples, "trainctl_run_state", state="completed") == 1
    assert value(samples, "trainctl_run_state", state="running") == 0
    assert value(samples, "trainctl_run_info", version="0.1.0", world_size="1") == 1
    assert value(samples, "trainctl_layer_grad_norm", layer="layer.0") == 0.1
    assert value(samples, "trainctl_layer_weight_norm", layer="embedding") == 2.0
    assert value(samples, "trainctl_last_success_timestamp_seconds") > 0
    assert value(samples, "trainctl_restarts_total") == 0 and "trainctl_recovery_seconds" not in samples  # a first start
    assert [n.kind for n in emitted] == ["metrics"]  # served on a free port, closed at run end
    # the generic export: every step and eval metric by name, values of the last logged step (4)
    steps = {labels["name"]: v for labels, v in samples["trainctl_step_metric"]}
    assert steps == {"rewards/accuracies": 3.0, "rewards/margins": 0.8, "logps/chosen": -122.0,
                     "mean_token_accuracy": 1.6, "odd_name_x__1___": 4.0}
    evals = {(labels["split"], labels["source"], labels["name"]): v for labels, v in samples["trainctl_eval_metric"]}
    assert evals == {("val", "local", "perplexity"): pytest.approx(math.exp(1.5)), ("val", "local", "accuracy"): 0.5,
                     ("val", "local", "rewards/accuracies"): 0.625}


def test_metric_names_are_capped_with_one_warning(tmp_path, capsys):
    plugin, _ = exporter(tmp_path, max_metric_names=3)
    plugin.trainctl_run_start(RunStart(run_name="t", backend="fake", out_dir="o", start_step=0, max_steps=9,
                                       params=1, tokens_per_step=8, time=0.0))

    def step(n: int, metrics: dict[str, float]) -> None:
        plugin.trainctl_step_end(StepEnd(step=n, max_steps=9, lr=0.1, tokens=8 * n, step_time=0.01, logged=True,
                                         loss=1.0, metrics=metrics, time=0.0))

    step(1, {"a": 1.0, "b": 1.0})
    step(2, {"a": 2.0, f"step {2}": 2.0, "a/b": 2.0, "c": 2.0})  # the third name fills the cap; 'a/b' and 'c' are over it
    plugin.trainctl_eval_end(EvalEnd(step=2, split="val", loss=1.0, time=0.0, metrics={"b": 5.0, "d": 5.0}))
    step(3, {"a": 3.0, "step 3": 3.0, "e": 3.0})
    try:
        samples = parse(generate_latest(plugin.registry).decode())
    finally:
        plugin.trainctl_run_end(RunEnd(status="completed", step=3, tokens=24, duration=1.0, time=0.0))
    assert {labels["name"]: v for labels, v in samples["trainctl_step_metric"]} == {"a": 3.0, "b": 1.0, "step_2": 2.0}
    assert {labels["name"]: v for labels, v in samples["trainctl_eval_metric"]} == {"b": 5.0}  # the cap is shared
    warnings = [line for line in capsys.readouterr().err.splitlines() if "prometheus" in line]
    assert warnings == ["trainctl: warning: prometheus: more than 3 distinct step/eval metric names; 'a/b' and any "
                        "later new names are not exported. Raise plugin.prometheus.max_metric_names if they are all wanted"]


def test_metric_names_that_sanitise_alike_share_one_series(tmp_path):
    plugin, _ = exporter(tmp_path, max_metric_names=1)
    plugin.trainctl_run_start(RunStart(run_name="t", backend="fake", out_dir="o", start_step=0, max_steps=9,
                                       params=1, tokens_per_step=8, time=0.0))
    plugin.trainctl_step_end(StepEnd(step=1, max_steps=9, lr=0.1, tokens=8, step_time=0.01, logged=True, loss=1.0,
                                     metrics={"x y": 1.0, "x:y": 2.0, "z" * 300: 3.0}, time=0.0))
    try:
        samples = parse(generate_latest(plugin.registry).decode())
    finally:
        plugin.trainctl_run_end(RunEnd(status="completed", step=1, tokens=8, duration=1.0, time=0.0))
    assert [(labels["name"], v) for labels, v in samples["trainctl_step_metric"]] == [("x_y", 2.0)]
    plugin, _ = exporter(tmp_path)
    assert plugin.label("z" * 300) == "z" * 100 and plugin.label("") == "_" and plugin.label("é/x") == "_/x"


def test_failed_run_sets_no_success_timestamp(tmp_path):
    plugin, _ = exporter(tmp_path)
    feed_run(plugin, status="failed")
    samples = parse(generate_latest(plugin.registry).decode())
    assert "trainctl_last_success_timestamp_seconds" not in samples
    assert value(samples, "trainctl_run_state", state="failed") == 1


def test_run_state_follows_state_notices(tmp_path):
    plugin, _ = exporter(tmp_path)
    plugin.trainctl_run_start(RunStart(run_name="t", backend="fake", out_dir="o", start_step=0, max_steps=4,
                                       params=1, tokens_per_step=8, time=0.0))

    def state() -> str:
        rows = parse(generate_latest(plugin.registry).decode())["trainctl_run_state"]
        [current] = [labels["state"] for labels, v in rows if v == 1]
        return current

    seen = [state()]
    for kind, follow in (("evaluating", EvalEnd(step=1, split="val", loss=1.0, time=0.0)),
                         ("saving", CheckpointSaved(step=1, path="p", reason="interval", duration=0.1, time=0.0)),
                         ("paused", Notice(step=1, kind="resumed", time=0.0))):
        plugin.trainctl_notice(Notice(step=1, kind=kind, time=0.0))
        seen.append(state())
        getattr(plugin, {EvalEnd: "trainctl_eval_end", CheckpointSaved: "trainctl_checkpoint_saved",
                         Notice: "trainctl_notice"}[type(follow)])(follow)
        seen.append(state())
    plugin.trainctl_notice(Notice(step=1, kind="saving", time=0.0))  # a save that never reported back
    plugin.trainctl_step_end(StepEnd(step=2, max_steps=4, lr=0.1, tokens=16, step_time=0.01, logged=False, time=0.0))
    seen.append(state())
    plugin.trainctl_run_end(RunEnd(status="stopped", step=2, tokens=16, duration=1.0, time=0.0))
    assert seen + [state()] == ["running", "evaluating", "running", "saving", "running", "paused", "running",
                                "running", "stopped"]


def test_promtool_accepts_the_exposition(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs the Debian 'prometheus' package")
        pytest.skip("promtool not installed (apt-get install prometheus); this check always runs in CI")
    plugin, _ = exporter(tmp_path)
    feed_run(plugin)
    proc = subprocess.run([promtool, "check", "metrics"], input=generate_latest(plugin.registry),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert proc.stdout.decode().strip() == "" and proc.stderr.decode().strip() == ""  # no lint warnings either


def test_step_histogram_observes_each_steps_own_duration(registry, tmp_path):
    """The kernel reports each step's own duration (and the interval's mean beside it), so one
    slow step among fast ones lands in its own bucket (a mean would hide it)."""
    config = make_config(registry, tmp_path / "out", 'plugins=["recorder"]', "train.max_steps=5", "train.log_interval=5")
    session = Run(config, registry, resume="never")
    fast_step = session.backend.train_step

    def train_step(step):
        if step == 2:
            time.sleep(0.3)
        return fast_step(step)

    session.backend.train_step = train_step
    session.fit()
    steps = [e for e in INSTANCES["recorder"].events if isinstance(e, StepEnd)]
    plugin, _ = exporter(tmp_path)
    for event in steps:
        plugin.trainctl_step_end(event)
    samples = parse(generate_latest(plugin.registry).decode())
    assert value(samples, "trainctl_step_duration_seconds_bucket", le="0.25") == 4
    assert value(samples, "trainctl_step_duration_seconds_bucket", le="1.0") == 5
    assert value(samples, "trainctl_step_duration_seconds_sum") == pytest.approx(sum(e.step_time for e in steps))
    assert steps[-1].mean_step_time == pytest.approx(sum(e.step_time for e in steps) / 5)


def test_endpoint_serves_only_metrics_and_outlives_a_silent_client(tmp_path):
    plugin, emitted = exporter(tmp_path)
    plugin.trainctl_run_start(RunStart(run_name="t", backend="fake", out_dir=str(tmp_path), start_step=0,
                                       max_steps=4, params=1, tokens_per_step=8, time=time.time()))
    url = emitted[0].data["address"]
    try:
        with socket.create_connection(plugin.server.address):  # connects, never sends a request
            started = time.monotonic()
            assert value(scrape(url), "trainctl_step") == 0
            assert time.monotonic() - started < 3  # the silent client was dropped after its timeout
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=5)
        assert missing.value.code == 404
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5) as head:
            assert head.status == 200 and head.read() == b"" and "text/plain" in head.headers["Content-Type"]
    finally:
        plugin.trainctl_run_end(RunEnd(status="completed", step=0, tokens=0, duration=0.0, time=time.time()))
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def dribble(address: tuple, stop: threading.Event, cut: list[float]) -> None:
    """A slow-loris client: a request head that never ends, one byte every 0.5 s, until the server
    closes the connection; ``cut`` gets the seconds from connecting to that."""
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    with socket.create_connection(address) as s:
        started = time.monotonic()
        s.settimeout(0.5)  # the pace: wait this long for the server's close after each byte
        for byte in head:
            if stop.is_set():
                return
            try:
                s.sendall(bytes([byte]))
                if s.recv(1) == b"":
                    break  # closed by the server
            except TimeoutError:
                continue  # still open
            except OSError:
                break  # reset by the server
        cut.append(time.monotonic() - started)


def timed_scrape(url: str) -> float:
    """Seconds a scrape of ``url`` took (it must answer within 3 s at all)."""
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=3) as response:
        assert value(parse(response.read().decode()), "trainctl_step") == 0
    return time.monotonic() - started


def serving(tmp_path: Path, **config) -> tuple[PrometheusExporter, str]:
    plugin, emitted = exporter(tmp_path, **config)
    plugin.trainctl_run_start(RunStart(run_name="t", backend="fake", out_dir=str(tmp_path), start_step=0,
                                       max_steps=4, params=1, tokens_per_step=8, time=time.time()))
    return plugin, emitted[0].data["address"]


def test_slow_clients_are_cut_off_at_the_deadline_and_never_delay_a_scrape(tmp_path):
    """Slow-loris: 4 clients dribbling a request one byte every 0.5 s. The deadline is for the
    whole request, not per recv (with a 1 s timeout per recv one such client held the endpoint
    for hours and every scrape timed out); the clients are served side by side, so scrapes are
    answered while they are connected."""
    plugin, url = serving(tmp_path, request_timeout=1.5)
    stop, cut = threading.Event(), []
    clients = [threading.Thread(target=dribble, args=(plugin.server.address, stop, cut), daemon=True)
               for _ in range(4)]
    try:
        for client in clients:
            client.start()
        time.sleep(0.6)  # every client connected and dribbling
        assert max(timed_scrape(url) for _ in range(3)) < 1.0
        for client in clients:
            client.join(timeout=5)
        assert len(cut) == 4 and all(1.4 < t < 2.6 for t in cut), cut  # 1.5 s after connecting, not later
        assert timed_scrape(url) < 1.0
    finally:
        stop.set()
        plugin.trainctl_run_end(RunEnd(status="completed", step=0, tokens=0, duration=0.0, time=time.time()))


def test_connections_past_the_cap_close_the_oldest(tmp_path):
    """A flood of connections that start a request and stall, under a long deadline: past
    max_connections the oldest are closed, so descriptors stay bounded and a scrape is still
    answered at once."""
    plugin, url = serving(tmp_path, request_timeout=60, max_connections=4)
    silent = [socket.create_connection(plugin.server.address) for _ in range(10)]
    for s in silent:
        s.sendall(b"G")
    time.sleep(0.2)  # all accepted
    try:
        assert timed_scrape(url) < 1.0
        for s in silent:
            s.settimeout(2)
        closed = [s.recv(1) == b"" for s in silent[:6]]  # 10 + the scrape over a cap of 4: the first 6 (or 7)
        assert all(closed)
    finally:
        for s in silent:
            s.close()
        plugin.trainctl_run_end(RunEnd(status="completed", step=0, tokens=0, duration=0.0, time=time.time()))


# --- the endpoint while the real kernel runs (in a thread, scraped from the test thread) -------


def start(registry, tmp_path, *overrides, prepare=lambda session: None):
    config = make_config(registry, tmp_path / "out", *overrides)
    session = Run(config, registry, resume="never")
    prepare(session)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=session.fit()), daemon=True)
    thread.start()
    return session, thread, result


def plugin_notices() -> list[Notice]:
    """Notices other than the loop's own announcements of evaluating and saving."""
    return [e for e in INSTANCES["recorder"].events if isinstance(e, Notice) and e.kind not in ("evaluating", "saving")]


def metrics_address(timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in list(INSTANCES["recorder"].events):
            if isinstance(event, Notice) and event.kind == "metrics":
                return event.data["address"]
        time.sleep(0.01)
    raise AssertionError("no 'metrics' notice with the address")


class Hold:
    """Wraps a backend method: its first call waits (on the training thread) until released."""

    def __init__(self, fn) -> None:
        self.fn, self.inside, self.release, self.calls = fn, threading.Event(), threading.Event(), 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == 1:
            self.inside.set()
            self.release.wait(10)
        return self.fn(*args)


def test_served_during_eval_save_and_pause(registry, tmp_path):
    holds = {}

    def prepare(session):
        holds["eval"] = session.backend.evaluate = Hold(session.backend.evaluate)
        holds["save"] = session.backend.save = Hold(session.backend.save)

    _, thread, result = start(
        registry, tmp_path, 'plugins=["checkpoint", "script", "prometheus", "recorder"]', "plugin.prometheus.port=0",
        "train.max_steps=6", "train.log_interval=1", "train.eval_interval=2", "train.save_interval=3",
        "plugin.script.pause_at=[4]", "plugin.script.pause_polls=20", prepare=prepare,
    )
    url = metrics_address()
    seen = []
    for what in ("eval", "save"):
        assert holds[what].inside.wait(10), f"never reached {what}"
        samples = scrape(url)  # the training thread is inside evaluate/save right now
        state = {"eval": "evaluating", "save": "saving"}[what]
        seen.append((what, value(samples, "trainctl_step"), value(samples, "trainctl_run_state", state=state)))
        holds[what].release.set()
    assert seen == [("eval", 2, 1), ("save", 3, 1)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        samples = scrape(url)
        if value(samples, "trainctl_run_state", state="paused") == 1:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("never saw the paused state")
    assert value(samples, "trainctl_step") == 4 and value(samples, "trainctl_run_state", state="running") == 0
    assert value(samples, "trainctl_eval_loss", split="val", source="local") > 0
    assert value(samples, "trainctl_checkpoints_saved_total") == 1
    thread.join(30)
    assert result["r"].status == "completed"
    with pytest.raises(OSError):  # closed at run end: the port is free again
        urllib.request.urlopen(url, timeout=2)


def test_busy_port_is_a_warning_not_a_failure(registry, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = make_config(registry, tmp_path / "out", 'plugins=["prometheus", "recorder"]',
                             f"plugin.prometheus.port={port}", "train.max_steps=3")
        result = Run(config, registry, resume="never").fit()
    assert result.status == "completed" and result.step == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "prometheus" in line]
    assert len(err) == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in err[0] and "plugin.prometheus.port" in err[0]
    assert [n.kind for n in plugin_notices()] == ["metrics_unavailable"]
    # emitted in run_start, delivered before the first step (the kernel delivers right after it)
    assert INSTANCES["recorder"].calls[:3] == [("run_start", 0), ("notice", 0), ("step", 1)]


def test_only_local_rank_zero_serves_by_default(monkeypatch, tmp_path):
    info = RunInfo(run_name="t", backend="gpt", out_dir=tmp_path, max_steps=4, rank=3, local_rank=1, world_size=4)
    assert isinstance(make(Config(), info), NotServing)
    assert isinstance(make(Config(per_rank_ports=True), info), PrometheusExporter)
    assert make(Config(per_rank_ports=True, port=9500), info).port() == 9501
    assert make(Config(per_rank_ports=True, port=0), info).port() == 0  # each rank its own free port


def test_rank_handling(tmp_path):
    """Rank 1 of 2 serves on port + local rank, labelled with its rank, when per-rank ports are on,
    and not at all otherwise (the kernel passes torchrun's RANK/LOCAL_RANK/WORLD_SIZE in RunInfo)."""
    base = free_port() - 1
    emitted: list = []
    info = RunInfo(run_name="t", backend="fake", out_dir=tmp_path, max_steps=4, rank=1, local_rank=1,
                   world_size=2, emit=emitted.append)
    plugin = make(Config(port=base, per_rank_ports=True), info)
    assert isinstance(plugin, PrometheusExporter)
    plugin.trainctl_run_start(RunStart(run_name="t", backend="fake", out_dir=str(tmp_path), start_step=0,
                                       max_steps=4, params=1, tokens_per_step=8, world_size=2, time=time.time()))
    try:
        url = next(e.data["address"] for e in emitted if isinstance(e, Notice) and e.kind == "metrics")
        assert url == f"http://127.0.0.1:{base + 1}/metrics"
        samples = scrape(url)
        assert value(samples, "trainctl_run_info", world_size="2") == 1
        assert {labels["rank"] for rows in samples.values() for labels, _ in rows} == {"1"}
    finally:
        plugin.trainctl_run_end(RunEnd(status="completed", step=0, tokens=0, duration=0.0, time=time.time()))
    assert isinstance(make(Config(port=base), info), NotServing)  # no per-rank ports: rank 1 stays silent


class Gateway(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Gateway.requests.append((self.command, self.path, body.decode()))
        self.send_response(200)
        self.end_headers()

    do_PUT = do_POST

    def log_message(self, *args):
        pass


def test_pushgateway_gets_the_final_metrics(registry, tmp_path, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Gateway.requests = []
    try:
        config = make_config(registry, tmp_path / "out", 'plugins=["prometheus"]', "plugin.prometheus.port=0",
                             f"plugin.prometheus.pushgateway='http://127.0.0.1:{server.server_port}'",
                             "train.run_name='nightly'", "train.max_steps=3")
        assert Run(config, registry, resume="never").fit().status == "completed"
    finally:
        server.shutdown()
        server.server_close()
    [(method, path, body)] = Gateway.requests
    assert method == "POST" and path == "/metrics/job/trainctl/rank/0/run/nightly"  # pushadd, grouped by run and rank
    samples = parse(body)
    assert value(samples, "trainctl_last_success_timestamp_seconds") == pytest.approx(time.time(), abs=60)
    assert value(samples, "trainctl_step") == 3
    assert value(samples, "trainctl_run_state", state="completed") == 1

    # an unreachable gateway is a warning: the run still completed
    config = make_config(registry, tmp_path / "out2", 'plugins=["prometheus"]', "plugin.prometheus.port=0",
                         f"plugin.prometheus.pushgateway='http://127.0.0.1:{free_port()}'", "train.max_steps=2")
    assert Run(config, registry, resume="never").fit().status == "completed"
    assert "push to http://127.0.0.1:" in capsys.readouterr().err


def test_a_restarted_run_exports_its_restarts_and_where_the_recovery_time_went(tmp_path):
    plugin, _ = exporter(tmp_path)
    t = time.time()
    plugin.trainctl_run_start(RunStart(run_name="t", backend="fake", out_dir=str(tmp_path), start_step=40, max_steps=80,
                                       params=10, tokens_per_step=8, restarts=3, time=t))
    phases = {"down_s": 1.5, "process_start_s": 2.0, "rendezvous_s": 0.25, "setup_s": 0.5, "checkpoint_load_s": 0.125,
              "first_step_s": 0.0625}
    plugin.trainctl_notice(Notice(step=41, kind="recovery", time=t, data={
        "restarts": 3, "last_step": 45, "last_step_source": "events", **phases, "total_s": sum(phases.values())}))
    samples = parse(generate_latest(plugin.registry).decode())
    plugin.trainctl_run_end(RunEnd(status="completed", step=80, tokens=640, duration=1.0, time=t))
    assert value(samples, "trainctl_restarts_total") == 3
    exported = {labels["phase"]: v for labels, v in samples["trainctl_recovery_seconds"]}
    assert exported == {**{k.removesuffix("_s"): v for k, v in phases.items()}, "total": 4.4375}
