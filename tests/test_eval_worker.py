"""``trainctl eval-worker`` as a real process on loopback: auth, roots, idempotency, error
answers, persistence across a SIGKILL, and ``trainctl eval`` on the same checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest

from tests.conftest import run_cli
from tests.worker_process import Worker, copy_checkpoint, events, train

TOKEN = "t0ken-for-tests"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A root holding a trained run (checkpoints at steps 10 and 20); ``outside`` is not a root."""
    base = tmp_path_factory.mktemp("worker")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    train(root / "run", "train.max_steps=20", "train.save_interval=10", "train.eval_interval=0")
    return root


@pytest.fixture(scope="module")
def worker(root):
    w = Worker(root.parent / "state", [root], token=TOKEN).start()
    yield w
    w.stop()


def submit(worker, checkpoint, step, **kw):
    return worker.request("POST", "/jobs", {"run": "r1", "checkpoint": str(checkpoint), "step": step}, **kw)


def test_token_is_required_and_checked(worker, root):
    ckpt = root / "run" / "checkpoints" / "step-000010"
    status, body, headers = submit(worker, ckpt, 10, token="")
    assert status == 401 and "bearer token" in body["error"] and headers.get("www-authenticate") == "Bearer"
    assert submit(worker, ckpt, 10, token="wrong")[0] == 401
    assert worker.request("GET", "/jobs?run=r1", token="nope")[0] == 401
    assert worker.request("GET", "/health", token="")[0] == 200


def test_result_equals_the_runs_own_eval_and_resubmission_returns_the_same_job(worker, root):
    ckpt = root / "run" / "checkpoints" / "step-000020"
    status, job, _ = submit(worker, ckpt, 20)
    assert status == 201 and job["status"] in ("queued", "running")
    again, same, _ = submit(worker, ckpt, 20)
    assert again == 200 and same["id"] == job["id"]
    done = worker.wait_job(job["id"])
    assert done["status"] == "done" and done["attempts"] == 1, done
    result = done["result"]
    # fixed evaluation batches on the same device: bit-identical to the run's own final
    # evaluation of these weights (test_remote_eval compares with `trainctl eval` too)
    in_run = {e["split"]: e["loss"] for e in events(root / "run") if e["event"] == "eval" and e["step"] == 20}
    assert result["val_loss"] == in_run["val"] and result["train_loss"] == in_run["train"]
    assert result["perplexity"] == math.exp(result["val_loss"]) and result["step"] == 20
    in_run_accuracy = {e["split"]: e["metrics"]["accuracy"] for e in events(root / "run") if e["event"] == "eval" and e["step"] == 20}
    assert result["accuracy"] == in_run_accuracy["val"] and result["train_accuracy"] == in_run_accuracy["train"]
    listed = worker.request("GET", "/jobs?run=r1")[1]["jobs"]
    assert [j["id"] for j in listed if j["step"] == 20] == [job["id"]]
    assert worker.request("GET", "/jobs?run=nobody")[1] == {"jobs": []}


def test_paths_outside_the_roots_are_refused(worker, root):
    outside = root.parent / "outside"
    foreign = copy_checkpoint(root / "run" / "checkpoints" / "step-000010", outside / "step-000010")
    status, body, _ = submit(worker, foreign, 10)
    assert status == 403 and "outside the worker's roots" in body["error"]
    link = root / "escape"
    link.symlink_to(outside, target_is_directory=True)
    status, body, _ = submit(worker, link / "step-000010", 10)  # inside by name, outside for real
    assert status == 403, body
    status, body, _ = submit(worker, root / "run" / ".." / ".." / "outside" / "step-000010", 10)
    assert status == 403, body
    status, body, _ = submit(worker, root / "run" / "checkpoints" / "step-999999", 999999)
    assert status == 422 and "does not exist" in body["error"]
    assert submit(worker, "run/checkpoints/step-000010", 10)[0] == 400  # relative


def test_corrupt_checkpoint_completes_with_an_error_result(worker, root):
    bad = copy_checkpoint(root / "run" / "checkpoints" / "step-000010", root / "corrupt-step-000010")
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    status, job, _ = submit(worker, bad, 10)
    assert status == 201
    done = worker.wait_job(job["id"])
    assert done["status"] == "error" and done["result"] is None
    assert "does not verify" in done["error"] and "model.safetensors" in done["error"]
    wrong_step = copy_checkpoint(root / "run" / "checkpoints" / "step-000010", root / "mislabelled")
    job = submit(worker, wrong_step, 11)[1]
    assert "is step 10, the job says step 11" in worker.wait_job(job["id"])["error"]


@pytest.mark.parametrize("raw, status, words", [
    (b'{"run": "r1",', 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"run": "r1"}', 400, "missing fields checkpoint, step"),
    (b'{"run": "r1", "checkpoint": "/x", "step": "ten"}', 400, "step must be"),
    (b'{"run": "", "checkpoint": "/x", "step": 1}', 400, "run must be"),
    (b'{"run": "r", "checkpoint": "/x", "step": 1, "colour": 1}', 400, "unknown field 'colour'"),
    (b'{"run": "r", "checkpoint": "/x", "step": 1, "evaluate": {"val_loss": false}}', 400, "asks for nothing"),
    (b'{"run": "r", "checkpoint": "/x", "step": 1, "evaluate": {"samples": {"prompts": []}}}', 400, "prompts"),
    (b'{"run": "r", "checkpoint": "/x", "step": 1, "evaluate": {"samples": {"prompts": ["a"], "max_new_tokens": 0}}}',
     400, "max_new_tokens"),
    (b'{"run": "' + b"a" * 70_000 + b'"}', 413, "body over 65536 bytes"),
])
def test_malformed_bodies_get_4xx_with_a_message(worker, raw, status, words):
    got, body, _ = worker.request("POST", "/jobs", raw=raw)
    assert got == status and words in body["error"], body


def test_unknown_jobs_methods_and_endpoints(worker):
    status, body, _ = worker.request("GET", "/jobs/0123456789abcdef")
    assert status == 404 and "no job" in body["error"]
    status, body, _ = worker.request("DELETE", "/jobs")
    assert status == 405 and "DELETE is not allowed" in body["error"]
    assert worker.request("PUT", "/health")[0] == 405
    status, body, _ = worker.request("GET", "/admin")
    assert status == 404 and "no endpoint /admin" in body["error"]
    assert worker.proc.poll() is None and worker.request("GET", "/health")[0] == 200  # still serving
    log = worker.log.read_text()
    assert "GET /admin 404" in log and "POST /jobs 413" in log  # one line per request


def test_killed_mid_job_the_job_completes_after_a_restart(root):
    slow = copy_checkpoint(root / "run" / "checkpoints" / "step-000020", root / "slow-step-000020", eval_steps=600)
    worker = Worker(root.parent / "state-kill", [root]).start()
    try:
        status, job, _ = submit(worker, slow, 20)
        assert status == 201
        worker.wait_job(job["id"], ("running",))
        time.sleep(0.5)
        worker.kill(signal.SIGKILL)
        on_disk = json.loads((worker.state / "jobs" / f"{job['id']}.json").read_text())
        assert on_disk["status"] == "running"  # the job was mid-evaluation when the worker died
        worker.start()
        assert "1 queued (1 requeued after a restart)" in worker.log.read_text()
        done = worker.wait_job(job["id"], timeout=180)
        assert done["status"] == "done" and done["attempts"] == 2, done
        assert done["result"]["step"] == 20 and done["result"]["val_loss"] > 0
    finally:
        worker.stop()


def test_startup_refusals_are_one_line_exit_2(tmp_path, worker, root):
    proc = run_cli("eval-worker", "--host", "0.0.0.0", "--token", "", "--state", str(tmp_path / "s1"), "--root", str(root))
    assert proc.returncode == 2 and "not a loopback address" in proc.stderr and "--token" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("eval-worker", "--state", str(worker.state), "--root", str(root), "--port", "0")
    assert proc.returncode == 2 and "another eval-worker is using" in proc.stderr
    port = worker.url.rsplit(":", 1)[1]
    proc = run_cli("eval-worker", "--state", str(tmp_path / "s2"), "--root", str(root), "--port", port)
    assert proc.returncode == 2 and "cannot listen" in proc.stderr
    proc = run_cli("eval-worker", "--state", str(tmp_path / "s3"), "--root", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


def test_trainctl_eval_cli(root, worker):
    run_dir = root / "run"
    human = run_cli("eval", str(run_dir), check=True).stdout  # a run dir: its newest verified checkpoint
    assert "step-000020 (step 20, gpt, cpu)" in human
    job = worker.wait_job(submit(worker, run_dir / "checkpoints" / "step-000020", 20)[1]["id"])
    result = job["result"]
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert (f"val loss {result['val_loss']:.4f} | perplexity {result['perplexity']:.3f} | "
            f"accuracy {result['accuracy']:.4f} | train loss {result['train_loss']:.4f}") in human
    proc = run_cli("eval", str(root.parent / "outside"))
    assert proc.returncode == 2 and "no verified checkpoint" in proc.stderr
    assert os.path.isdir(run_dir / "checkpoints" / "step-000010")  # nothing was written into the run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000010", "step-000020"]


def test_remote_eval_plugin_submits_again_a_job_the_worker_lost(worker, root, tmp_path):
    """In process: the plugin's sender thread against the live worker. Its outbox says step 10
    was submitted as a job the worker does not know (its state was lost): it is submitted again,
    and the result comes back as eval events for step 10."""
    from trainctl.hooks.events import EvalEnd, RunEnd, RunStart
    from trainctl.hooks.plugin import RunInfo
    from trainctl.plugins.remote_eval import Config, RemoteEval
    from trainctl.remote.outbox import Outbox, Submission

    out = tmp_path / "run"
    ckpt = root / "run" / "checkpoints" / "step-000010"
    Outbox(out / "remote_eval" / "outbox").add(Submission(step=10, checkpoint=str(ckpt), status="submitted", job="feedfacefeedface"))
    emitted = []
    info = RunInfo(run_name="lost", backend="gpt", out_dir=out, max_steps=20, emit=emitted.append)
    plugin = RemoteEval(Config(url=worker.url, token=TOKEN, poll_s=0.1, wait_at_end_s=60), info)
    plugin.trainctl_run_start(RunStart(run_name="lost", backend="gpt", out_dir=str(out), start_step=10, max_steps=20,
                                       params=1, tokens_per_step=1, time=time.time()))
    plugin.trainctl_run_end(RunEnd(status="completed", step=10, tokens=0, duration=1.0, time=time.time()))
    evals = [e for e in emitted if isinstance(e, EvalEnd)]
    assert [(e.step, e.split, e.source) for e in evals] == [(10, "train", "remote"), (10, "val", "remote")]
    [sub] = Outbox(out / "remote_eval" / "outbox").all()
    assert sub.status == "done" and sub.job != "feedfacefeedface" and sub.result["val_loss"] == evals[1].loss
    assert "404" in worker.log.read_text().split("feedfacefeedface", 1)[1].splitlines()[0]
