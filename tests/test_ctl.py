"""`trainctl ctl` and `trainctl status` against a live `trainctl run` in a subprocess."""

from __future__ import annotations

import json
import time

from tests.conftest import make_config, run_cli
from tests.recording_plugins import INSTANCES
from tests.live import LiveRun
from trainctl.kernel.run import Run


def ctl(out, command, *more) -> str:
    proc = run_cli("ctl", str(out), command, *more, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def test_pause_save_eval_resume_stop_against_a_live_run(tmp_path):
    out = tmp_path / "run"
    run = LiveRun(out, "train.max_steps=1000000", "train.log_interval=5", "train.eval_interval=0", "train.eval_steps=2")
    try:
        run.wait(lambda s: s["state"] == "running" and s["step"] >= 3)

        answer = ctl(out, "pause")
        assert answer.startswith("pause: pausing") and "[step " in answer
        paused = run.wait(lambda s: s["state"] == "paused", timeout=10)
        time.sleep(0.6)
        assert run.status()["step"] == paused["step"]  # no step while paused, process alive
        assert run.proc.poll() is None

        shown = run_cli("status", str(out), check=True).stdout
        assert f"paused (pid {run.proc.pid}" in shown and f"step       {paused['step']} / 1000000" in shown
        as_json = json.loads(run_cli("status", str(out), "--json", check=True).stdout)
        assert as_json["alive"] is True and as_json["state"] == "paused"

        answer = ctl(out, "save")
        assert answer.startswith(f"save: saved {out}/checkpoints/step-{paused['step']:06d} at step {paused['step']}")
        assert run.ledger()[-1]["reason"] == "request"
        answer = ctl(out, "eval")
        assert answer.startswith(f"eval: step {paused['step']}: train ") and "val " in answer
        assert run.status()["state"] == "paused" and run.status()["val_loss"] is not None

        second = run_cli("run", "--yes", "--out", str(out), "--set", "train.threads=1")
        assert second.returncode == 2 and "another run is live in" in second.stderr

        assert ctl(out, "resume").startswith("resume: resuming")
        run.wait(lambda s: s["state"] == "running" and s["step"] > paused["step"] + 2, timeout=20)
        answer = ctl(out, "eval")  # while running: acknowledged at the next step, then done
        assert answer.startswith("eval: step ")

        answer = ctl(out, "stop")
        assert answer.startswith("stop: stopping")
        assert run.exit_code() == 0
        status = run.status()
        assert status["state"] == "stopped" and status["reason"] == "request"
        assert run.ledger()[-1]["reason"] == "request" and run.ledger()[-1]["step"] == status["step"]
        commands = [e["data"]["command"] for e in run.events() if e["event"] == "notice" and e["kind"] == "control"]
        assert commands == ["pause", "save", "eval", "resume", "eval", "stop"]
        kinds = [e["kind"] for e in run.events() if e["event"] == "notice"]
        assert kinds.count("paused") == 1 and kinds.count("resumed") == 1
    finally:
        run.close()

    gone = run_cli("ctl", str(out), "stop")
    assert gone.returncode == 2
    assert gone.stderr.strip() == (
        f"trainctl: error: no live run in {out}: its last run is stopped (pid {status['pid']} is not running it); "
        f"start one with trainctl run --out {out}"
    )
    assert not list((out / "control").glob("cmd-*"))  # the refused command left nothing behind
    shown = run_cli("status", str(out), check=True).stdout
    assert "state      stopped: request" in shown


def test_ctl_without_a_run(tmp_path):
    proc = run_cli("ctl", str(tmp_path), "pause")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"trainctl: error: no live run in {tmp_path}: no run has started there"
    proc = run_cli("status", str(tmp_path))
    assert proc.returncode == 2 and "no status.json" in proc.stderr


def test_status_after_a_crash_says_failed_with_the_error(registry, tmp_path):
    out = tmp_path / "out"
    session = Run(make_config(registry, out, 'plugins=["controller", "status"]', "train.max_steps=6"), registry, resume="never")
    session.backend.fail_at = 3
    assert session.fit().status == "failed"
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == "RuntimeError: boom" and status["step"] == 3
    shown = run_cli("status", str(out), check=True).stdout
    assert "state      failed: RuntimeError: boom" in shown and "error      RuntimeError: boom" in shown


def test_status_of_a_killed_run_says_it_is_gone(tmp_path):
    out = tmp_path / "run"
    run = LiveRun(out, "train.max_steps=1000000", "train.eval_interval=0")
    try:
        run.wait(lambda s: s["state"] == "running")
        run.proc.kill()
        run.proc.wait()
    finally:
        run.close()
    shown = run_cli("status", str(out), check=True).stdout
    assert f"but its process (pid {run.proc.pid} on " in shown and "is gone: it crashed or was killed" in shown
    assert json.loads(run_cli("status", str(out), "--json", check=True).stdout)["alive"] is False


def test_status_records_the_metrics_address_and_completion(registry, tmp_path):
    from trainctl.hooks.events import Notice

    out = tmp_path / "out"
    session = Run(make_config(registry, out, 'plugins=["checkpoint", "status"]', "train.max_steps=4",
                              "train.log_interval=2"), registry, resume="never")
    session.info.emit(Notice(step=0, kind="metrics", data={"address": "http://127.0.0.1:9464/metrics"}, time=0.0))
    assert session.fit().status == "completed"
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 4 and status["max_steps"] == 4
    assert status["metrics_address"] == "http://127.0.0.1:9464/metrics"
    assert status["last_checkpoint"]["path"].endswith("step-000004") and status["last_checkpoint"]["reason"] == "end"
    assert status["loss"] == 10 / 4 and status["val_loss"] == 2 / 5 and status["eta_s"] == 0.0
    assert status["tokens_per_s"] > 0 and status["error"] is None
    assert "restarts" not in run_cli("status", str(out), check=True).stdout  # a run never restarted says nothing of it


def test_status_shows_restarts_and_the_last_recovery(tmp_path):
    doc = {"state": "running", "run_name": "r", "backend": "gpt", "out_dir": str(tmp_path), "step": 50, "max_steps": 100,
           "pid": 1, "host": "h", "restarts": 2, "recovery": {"total_s": 7.14, "down_s": 0.5}, "started": 1.0, "updated": 2.0}
    (tmp_path / "status.json").write_text(json.dumps(doc))
    shown = run_cli("status", str(tmp_path), check=True).stdout
    assert "restarts   2, last recovery 7.1 s from the last step before the fault to the first after it" in shown


def test_a_failing_observer_is_reported_once_by_name_and_disabled(registry, tmp_path, capfd):
    out = tmp_path / "out"
    (out / "status.json").mkdir(parents=True)  # the status file cannot be replaced: every write fails
    session = Run(make_config(registry, out, 'plugins=["checkpoint", "status", "recorder"]', "train.max_steps=8",
                              "train.log_interval=1", "train.plugin_max_failures=2"), registry, resume="never")
    result = session.fit()
    assert result.status == "completed" and result.step == 8  # the run goes on without it
    err = capfd.readouterr().err
    assert err.count("trainctl: plugin 'status' failed in ") == 1 and "IsADirectoryError" in err
    assert "trainctl: plugin 'status' disabled after 2 failures" in err
    from tests.recording_plugins import INSTANCES

    kinds = [(e.kind, e.data.get("plugin")) for e in INSTANCES["recorder"].events
             if type(e).__name__ == "Notice" and e.kind.startswith("plugin_")]
    assert kinds == [("plugin_error", "status"), ("plugin_disabled", "status")]
    assert (out / "checkpoints" / "step-000008").is_dir()  # the critical plugin was unaffected


def test_console_prints_control_notices_and_hides_announcements(tmp_path):
    import io

    from trainctl.hooks.events import Notice
    from trainctl.hooks.plugin import RunInfo
    from trainctl.plugins.console import Config, Console

    stream = io.StringIO()
    console = Console(Config(format="json"), RunInfo(run_name="r", backend="gpt", out_dir=tmp_path, max_steps=9), stream)
    console.trainctl_notice(Notice(step=3, kind="control", message="pause: pausing", time=0.0))
    console.trainctl_notice(Notice(step=3, kind="saving", message="interval", time=0.0))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(l["event"], l["message"], l["step"]) for l in lines] == [("control", "pause: pausing", 3)]


def test_stop_while_paused_saves_and_ends_stopped(registry, tmp_path):
    import threading

    from trainctl.control import channel
    from trainctl.control.files import read_json

    out = tmp_path / "out"
    session = Run(make_config(registry, out, 'plugins=["controller", "checkpoint", "status", "recorder"]',
                              "train.max_steps=100000000"), registry, resume="never")
    results = []
    worker = threading.Thread(target=lambda: results.append(session.fit()))  # signals need the main thread: not used here
    worker.start()

    def ask(command: str) -> dict:
        ident = channel.send(out, command)
        for _ in range(500):
            answer = read_json(channel.ack_path(channel.control_dir(out), ident))
            if answer:
                return answer
            time.sleep(0.01)
        raise AssertionError(f"no answer to {command}")

    try:
        paused = ask("pause")
        assert paused["status"] == "accepted" and paused["state"] == "running"
        for _ in range(300):
            if json.loads((out / "status.json").read_text())["state"] == "paused":
                break
            time.sleep(0.01)
        stopped = ask("stop")
        assert stopped["state"] == "paused"  # answered by the paused run's polling
        worker.join(30)
    finally:
        if worker.is_alive():
            channel.send(out, "stop")
            worker.join(30)
    result = results[0]
    assert result.status == "stopped" and result.reason == "request" and result.step == paused["step"]
    saves = [(e.step, e.reason) for e in INSTANCES["recorder"].events if type(e).__name__ == "CheckpointSaved"]
    assert saves == [(paused["step"], "request")]
    assert channel.live(out) is None  # the lock is released when the run ends
