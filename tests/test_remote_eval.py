"""The ``remote_eval`` plugin end to end: real gpt runs in subprocesses, a real eval worker on
loopback, and the results in ``events.jsonl``."""

from __future__ import annotations

import http.server
import json
import math
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, cli_env, make_config
from tests.worker_process import TINY, Worker, events, free_port, local_eval, sets, train
from trainctl.kernel.errors import ConfigError

PLUGINS = 'plugins=["lr", "checkpoint", "remote_eval", "console", "jsonl"]'
FAST = ["plugin.remote_eval.poll_s=0.2", "plugin.remote_eval.backoff_max_s=1.0"]


def remote_evals(out, split="val"):
    return [e for e in events(out) if e["event"] == "eval" and e["source"] == "remote" and e["split"] == split]


def test_live_run_with_a_live_worker(tmp_path):
    worker = Worker(tmp_path / "state", [tmp_path]).start()
    try:
        out = tmp_path / "run"
        train(out, PLUGINS, *FAST, f"plugin.remote_eval.url='{worker.url}'", "plugin.remote_eval.wait_at_end_s=120",
              "plugin.remote_eval.prompts=['ROMEO:']", "plugin.remote_eval.max_new_tokens=12",
              "train.max_steps=40", "train.save_interval=20", "train.eval_interval=20", "train.eval_loss='batches'")
        remote = remote_evals(out)
        assert [e["step"] for e in remote] == [20, 40]
        assert {e["loss_mean"] for e in remote} == {"batches"}  # the worker says which mean, as the run does
        for e in remote:
            assert e["metrics"]["perplexity"] == math.exp(e["loss"]) and 0.0 <= e["metrics"]["accuracy"] <= 1.0
        assert [e["step"] for e in remote_evals(out, "train")] == [20, 40]
        # remote == local `trainctl eval` of the same checkpoint == the run's own evaluation, exactly
        local = local_eval(out / "checkpoints" / "step-000040")
        assert remote[-1]["loss"] == local["val_loss"]
        in_run = {e["step"]: e["loss"] for e in events(out) if e["event"] == "eval" and e["source"] == "local" and e["split"] == "val"}
        assert in_run[20] == remote[0]["loss"] and in_run[40] == remote[1]["loss"]
        samples = [e for e in events(out) if e["event"] == "notice" and e["kind"] == "remote_eval_samples"]
        assert [s["step"] for s in samples] == [20, 40] and samples[0]["data"]["samples"][0]["prompt"] == "ROMEO:"
        kinds = [e["event"] for e in events(out)]
        assert kinds[-1] == "run_end"  # results that arrived while the run ended were logged before it
        run_id = json.loads((out / "remote_eval" / "outbox" / "step-000040.json").read_text())
        assert run_id["status"] == "done" and run_id["result"]["val_loss"] == remote[-1]["loss"]
    finally:
        worker.stop()


def test_worker_down_at_the_start_then_started_mid_run(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    args = [sys.executable, "-m", "trainctl", "run", "--yes", "--out", str(out),
            *sets(*TINY, PLUGINS, *FAST, f"plugin.remote_eval.url='http://127.0.0.1:{port}'",
                  "plugin.remote_eval.wait_at_end_s=120", "train.max_steps=240", "train.save_interval=30",
                  "train.eval_interval=0")]
    run = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = Worker(tmp_path / "state", [tmp_path], port=port)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000030").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.05)
        worker.start()
        stdout, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr
        steps = list(range(30, 241, 30))
        assert [e["step"] for e in remote_evals(out)] == steps  # every checkpoint, once each
        jobs = worker.request("GET", "/jobs")[1]["jobs"]
        assert sorted(j["step"] for j in jobs) == steps and all(j["attempts"] == 1 for j in jobs)  # none twice
        assert "unavailable" in stderr and "reachable again" in stderr
        kinds = [e.get("kind") for e in events(out) if e["event"] == "notice"]
        assert "remote_eval_unavailable" in kinds and "remote_eval_pending" not in kinds
    finally:
        if run.poll() is None:
            run.kill()
        worker.stop()


def test_open_submissions_are_reported_at_the_end_and_sent_again_on_resume(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    common = [PLUGINS, *FAST, f"plugin.remote_eval.url='http://127.0.0.1:{port}'", "train.save_interval=10",
              "train.eval_interval=0"]
    first = train(out, *common, "plugin.remote_eval.wait_at_end_s=0.5", "train.max_steps=20")
    assert "2 remote evaluation(s) still open (steps [10, 20])" in first.stderr
    pending = [e for e in events(out) if e["event"] == "notice" and e["kind"] == "remote_eval_pending"]
    assert pending and pending[0]["data"]["steps"] == [10, 20] and events(out)[-1]["event"] == "run_end"
    state = json.loads((out / "checkpoints" / "step-000020" / "plugins.json").read_text())["remote_eval"]
    assert [s["step"] for s in state["open"]] == [10]  # step 20's own state was written before it was saved
    # the checkpoint alone must be enough: drop the outbox, resume with the worker up
    shutil.rmtree(out / "remote_eval")
    worker = Worker(tmp_path / "state", [tmp_path], port=port).start()
    try:
        train(out, *common, "plugin.remote_eval.wait_at_end_s=120", "train.max_steps=30")
        assert sorted(e["step"] for e in remote_evals(out)) == [10, 20, 30]
        jobs = worker.request("GET", "/jobs")[1]["jobs"]
        assert sorted(j["step"] for j in jobs) == [10, 20, 30] and all(j["attempts"] == 1 for j in jobs)
    finally:
        worker.stop()


class SlowHandler(http.server.BaseHTTPRequestHandler):
    """A worker that takes 2 s to answer anything, and then answers 503."""

    requests: list[float] = []

    def _slow(self) -> None:
        SlowHandler.requests.append(time.time())
        time.sleep(2.0)
        body = b'{"error": "busy"}'
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _slow

    def log_message(self, *args) -> None:
        pass


def test_a_slow_worker_does_not_slow_training(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        common = ["train.max_steps=60", "train.save_interval=5", "train.eval_interval=0", "train.log_interval=5"]
        train(tmp_path / "base", *common)
        SlowHandler.requests.clear()
        train(tmp_path / "slow", PLUGINS, *common, f"plugin.remote_eval.url='http://127.0.0.1:{server.server_port}'",
              "plugin.remote_eval.timeout_s=10", "plugin.remote_eval.wait_at_end_s=0")
    finally:
        server.shutdown()
    base, slow = events(tmp_path / "base"), events(tmp_path / "slow")
    first, end = next(e for e in slow if e["event"] == "run_start"), slow[-1]
    assert [t for t in SlowHandler.requests if first["time"] < t < end["time"]]  # it was slow during the run
    # 12 checkpoints: a plugin that waited on the worker would add >= 24 s
    assert end["duration"] < 2 * base[-1]["duration"] + 8, (end["duration"], base[-1]["duration"])
    mean = lambda evs: sum(e["mean_step_time"] for e in evs if e["event"] == "step") / 12  # noqa: E731
    assert mean(slow) < 3 * mean(base) + 0.05, (mean(slow), mean(base))


def test_config_is_checked_before_training(registry, tmp_path):
    with pytest.raises(ConfigError, match='add "checkpoint" to plugins'):
        from trainctl.kernel.run import Run

        Run(make_config(registry, tmp_path, 'plugins=["remote_eval"]'), registry)
    with pytest.raises(ConfigError, match="url must start with http"):
        make_config(registry, tmp_path, 'plugins=["checkpoint", "remote_eval"]', "plugin.remote_eval.url='ftp://x'")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        make_config(registry, tmp_path, 'plugins=["checkpoint", "remote_eval"]', "plugin.remote_eval.val_loss=false")


def test_every_n_steps_and_the_last_checkpoint(tmp_path):
    from trainctl.hooks.events import CheckpointSaved
    from trainctl.hooks.plugin import RunInfo
    from trainctl.plugins.remote_eval import Config, RemoteEval

    plugin = RemoteEval(Config(every=20), RunInfo(run_name="r", backend="gpt", out_dir=tmp_path, max_steps=50))
    for step in (10, 20, 30, 40, 50):
        plugin.trainctl_checkpoint_saved(CheckpointSaved(step=step, path=str(tmp_path / f"c{step}"), reason="interval",
                                                         duration=0.0, time=0.0))
    assert [s.step for s in plugin.outbox.open()] == [20, 40, 50]
    assert sorted(p.name for p in (tmp_path / "remote_eval" / "outbox").iterdir()) == [
        "step-000020.json", "step-000040.json", "step-000050.json"]
    state = plugin.trainctl_state_dict()["remote_eval"]
    assert [s["step"] for s in state["open"]] == [20, 40, 50] and state["run_id"].startswith("r-")


def test_the_run_id_is_unguessable_and_kept_across_a_resume(tmp_path):
    """It was the run name and a hash of the run directory: anyone could work it out and file the
    run's jobs first."""
    import hashlib
    import os

    from trainctl.hooks.plugin import RunInfo
    from trainctl.plugins.remote_eval import Config, RemoteEval

    info = RunInfo(run_name="r", backend="gpt", out_dir=tmp_path, max_steps=50)
    first, second = RemoteEval(Config(), info), RemoteEval(Config(), info)
    guessable = "r-" + hashlib.sha256(os.path.realpath(tmp_path).encode()).hexdigest()[:8]
    assert first.run_id != guessable and first.run_id != second.run_id and len(first.run_id) == len("r-") + 16
    second.trainctl_load_state_dict({"remote_eval": first.trainctl_state_dict()["remote_eval"]})
    assert second.run_id == first.run_id  # resumed: the same run to the worker
    pinned = RemoteEval(Config(run_id="mine"), info)
    pinned.trainctl_load_state_dict({"remote_eval": {"run_id": first.run_id, "open": []}})
    assert pinned.run_id == "mine"


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 302 to ``target`` when it has one; records the headers of what it receives."""

    target = ""
    seen: list[dict[str, str]] = []

    def _answer(self) -> None:
        type(self).seen.append(dict(self.headers))
        body = b'{"id": "x", "status": "queued"}'
        self.send_response(302 if self.target else 200)
        if self.target:
            self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def serve(handler: type) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_redirect_is_not_followed_and_the_token_stays_home():
    """Before: urllib followed the worker's 302 and sent Authorization: Bearer to the other host."""
    from trainctl.remote.client import Unavailable, WorkerClient

    class Elsewhere(Recorder):
        seen = []

    class Redirecting(Recorder):
        seen = []

    elsewhere = serve(Elsewhere)
    Redirecting.target = f"http://127.0.0.1:{elsewhere.server_port}"
    worker = serve(Redirecting)
    try:
        client = WorkerClient(f"http://127.0.0.1:{worker.server_port}", token="s3cret-token")
        with pytest.raises(Unavailable) as raised:
            client.submit(run="r", checkpoint="/x", step=1, evaluate={"val_loss": True})
        assert f"HTTP 302 redirect to '{Redirecting.target}/jobs', not followed" in str(raised.value)
        assert Redirecting.seen[0]["Authorization"] == "Bearer s3cret-token"
        assert Elsewhere.seen == []  # the other host never heard from us
    finally:
        worker.shutdown()
        elsewhere.shutdown()


def test_the_token_is_not_saved_in_checkpoints(registry, tmp_path, monkeypatch):
    """Before: plugin.remote_eval.token landed in every checkpoint's config.toml, mode 0644."""
    import stat
    import tomllib

    from trainctl.kernel.run import Run

    config = make_config(registry, tmp_path / "out", 'plugins=["checkpoint", "remote_eval", "jsonl"]',
                         "train.max_steps=4", "train.save_interval=2", f"plugin.remote_eval.url='http://127.0.0.1:{free_port()}'",
                         "plugin.remote_eval.token='s3cret-token'", "plugin.remote_eval.wait_at_end_s=0")
    assert Run(config, registry, resume="never").fit().status == "completed"
    saved = sorted((tmp_path / "out" / "checkpoints").glob("step-*/config.toml"))
    assert len(saved) == 2
    for file in saved:
        assert "s3cret-token" not in file.read_text()
        assert tomllib.loads(file.read_text())["plugin"]["remote_eval"]["token"] == ""
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    # the saved config still resumes: the token comes from the environment then
    monkeypatch.setenv("TRAINCTL_EVAL_TOKEN", "from-env")
    resumed = Run(make_config(registry, tmp_path / "out", 'plugins=["checkpoint", "remote_eval", "jsonl"]',
                              "train.max_steps=6", "train.save_interval=2", "plugin.remote_eval.wait_at_end_s=0",
                              f"plugin.remote_eval.url='http://127.0.0.1:{free_port()}'"), registry)
    assert resumed.fit().status == "completed"
