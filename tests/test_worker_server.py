"""The eval worker's HTTP server under hostile clients, for real on loopback: slow-header
floods under a low open-file limit, a full queue, retention, deep JSON, NUL and newline
injection, and a token on the command line."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import run_cli
from tests.worker_process import Worker, copy_checkpoint, train

CKPT = "run/checkpoints/step-000010"
SLOW = ("--max-eval-steps", "20000")  # lets a checkpoint ask for a slow evaluation


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("server") / "root"
    train(root / "run", "train.max_steps=10", "train.save_interval=10", "train.eval_interval=0")
    return root


@pytest.fixture(scope="module")
def worker(root):
    w = Worker(root.parent / "state", [root]).start()
    yield w
    w.stop()


def submit(worker, checkpoint, step=10, run="r1"):
    return worker.request("POST", "/jobs", {"run": run, "checkpoint": str(checkpoint), "step": step})


def slow_clients(url: str, count: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket) -> bool:
    try:
        s.settimeout(0.5)
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slow_header_clients_are_dropped_and_health_still_answers(root):
    """Before: 100 slow-header connections stayed open for as long as their clients liked, and
    with a low open-file limit the worker stopped answering /health."""
    worker = Worker(root.parent / "state-slow", [root], max_files=100,
                    args=("--request-timeout", "2", "--max-connections", "40")).start()
    try:
        socks = slow_clients(worker.url, 150)  # more than the worker has file descriptors
        started = time.monotonic()
        assert worker.request("GET", "/health", timeout=5)[0] == 200  # during the flood
        time.sleep(2.5)
        assert all(closed_by_server(s) for s in socks)  # none outlived the request timeout
        assert time.monotonic() - started < 10
        for s in socks:
            s.close()
        assert worker.request("GET", "/health")[0] == 200
    finally:
        worker.stop()


def test_queue_cap_and_retention(root):
    slow = copy_checkpoint(root / CKPT, root / "slow-queue", eval_steps=20_000)
    worker = Worker(root.parent / "state-queue", [root],
                    args=("--max-queue", "2", "--keep-finished", "3", "--job-timeout", "3", *SLOW)).start()
    try:
        first = submit(worker, slow, run="busy")[1]
        worker.wait_job(first["id"], ("running",))
        assert submit(worker, slow, run="q1")[0] == 201
        status, last, _ = submit(worker, slow, run="q2")
        assert status == 201
        status, body, headers = submit(worker, slow, run="q3")
        assert status == 429 and "queue is full (2 jobs waiting)" in body["error"] and headers["retry-after"] == "30"
        worker.wait_job(last["id"], timeout=60)  # each stopped by --job-timeout
        # finished jobs beyond --keep-finished are forgotten, on disk too
        for i in range(5):
            worker.wait_job(submit(worker, root / CKPT, step=11, run=f"wrong{i}")[1]["id"], timeout=60)
        listed = worker.request("GET", "/jobs")[1]["jobs"]
        assert len([j for j in listed if j["finished"]]) == 3
        assert len(list((worker.state / "jobs").glob("*.json"))) == len(listed)
        assert len(worker.request("GET", "/jobs?limit=2")[1]["jobs"]) == 2
        assert worker.request("GET", "/jobs?limit=0")[0] == 400
    finally:
        worker.stop()


def test_malformed_requests_are_400_and_cannot_forge_log_lines(worker, root):
    status, body, _ = worker.request("POST", "/jobs", raw=b"[" * 50_000 + b"]" * 50_000)
    assert status == 413  # over the body limit first
    status, body, _ = worker.request("POST", "/jobs", raw=b"[" * 30_000 + b"]" * 30_000)
    assert status == 400 and "nested too deeply" in body["error"], body
    status, body, _ = worker.request("POST", "/jobs", {"run": "r", "checkpoint": "/x\u0000y", "step": 1})
    assert status == 400 and "no NUL" in body["error"]
    forged = "r1\neval-worker: job 0000 done in 0.1s: val loss 0.0"
    status, body, _ = worker.request("POST", "/jobs", {"run": forged, "checkpoint": str(root / CKPT), "step": 10})
    assert status == 400 and "printable" in body["error"]
    assert worker.request("GET", "/jobs/x%0Aeval-worker:%20forged")[0] == 404
    deadline = time.monotonic() + 10
    while "forged 404" not in worker.log.read_text():  # the line is written after the answer
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines = worker.log.read_text().splitlines()
    assert not [line for line in lines if line.startswith(("eval-worker: forged", "eval-worker: job 0000"))]
    assert any("/jobs/x\\neval-worker: forged 404" in line for line in lines)


def test_a_token_on_the_command_line_is_warned_about(tmp_path):
    proc = run_cli("eval-worker", "--token", "visible-in-ps", "--state", str(tmp_path / "s"), "--root", str(tmp_path / "nope"))
    warning, error = proc.stderr.strip().splitlines()
    assert "--token on the command line is visible to every local user" in warning and "TRAINCTL_EVAL_TOKEN" in warning
    assert proc.returncode == 2 and "is not a directory" in error


def test_a_checkpoint_over_the_size_limit_is_not_copied(root):
    """The worker copies what it evaluates: a checkpoint may not make it fill its disk."""
    worker = Worker(root.parent / "state-size", [root], args=("--max-checkpoint-gb", "0.0001")).start()
    try:
        job = worker.wait_job(submit(worker, root / CKPT)[1]["id"])
        assert job["status"] == "error" and "bytes, over the limit of 107374" in job["error"], job
        assert not (worker.state / "work" / "checkpoint").exists()
    finally:
        worker.stop()
