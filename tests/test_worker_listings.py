"""The eval worker's listings stay answerable and its jobs stay the submitter's, attacked for real
over HTTP on loopback: a lone surrogate in a prompt or a checkpoint path, ``?limit=²``, job files
holding NaN or a surrogate (as a NaN checkpoint's result or an older worker left them), a
submission that tries to claim another's job by guessing its id or by reusing its checkpoint with
another ``evaluate``, and a state directory made under umask 022."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from tests.worker_process import Worker


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "root"
    (root / "ckpt").mkdir(parents=True)  # a directory is enough to be accepted; its evaluation then fails
    worker = Worker(tmp_path / "state", [root])
    yield worker, root / "ckpt"
    worker.stop()


def raw_json(text: str) -> bytes:
    return text.encode()  # JSON escapes (\\ud800) as a client sends them: json.dumps would refuse nothing here


def listings(worker) -> list[int]:
    return [worker.request("GET", path)[0] for path in ("/jobs", "/jobs?run=r1", "/jobs?limit=5")]


def test_surrogates_and_odd_digits_are_400_and_listings_stay_200(setup):
    worker, ckpt = setup
    worker.start()
    surrogate_prompt = raw_json('{"run": "r1", "checkpoint": "%s", "step": 1, '
                                '"evaluate": {"samples": {"prompts": ["\\ud800"]}}}' % ckpt)
    status, body, _ = worker.request("POST", "/jobs", raw=surrogate_prompt)
    assert status == 400 and "surrogate" in body["error"] and "prompts[0]" in body["error"], body
    surrogate_path = raw_json('{"run": "r1", "checkpoint": "%s\\udcff", "step": 1}' % ckpt)
    status, body, _ = worker.request("POST", "/jobs", raw=surrogate_path)
    assert status == 400 and "checkpoint" in body["error"], body
    status, body, _ = worker.request("GET", "/jobs?limit=%C2%B2")  # "²": str.isdigit says yes
    assert status == 400 and "limit" in body["error"], body
    assert listings(worker) == [200, 200, 200]


def test_job_files_with_nan_or_a_surrogate_do_not_poison_the_listings(setup, tmp_path):
    worker, ckpt = setup
    worker.start()
    status, job, _ = worker.request("POST", "/jobs", {"run": "r1", "checkpoint": str(ckpt), "step": 1})
    assert status == 201
    worker.stop()
    jobs = tmp_path / "state" / "jobs"
    good = json.loads((jobs / f"{job['id']}.json").read_text())
    planted = {"nan": {**good, "id": "nan0", "seq": 90, "status": "done", "result": {"val_loss": float("nan")}},
               "surrogate": {**good, "id": "sur0", "seq": 91, "evaluate": {"samples": {"prompts": ["\ud800"]}}}}
    for name, content in planted.items():
        (jobs / f"{content['id']}.json").write_text(json.dumps(content))  # NaN and \ud800 as json writes them
    worker.start()
    assert listings(worker) == [200, 200, 200]
    ids = [j["id"] for j in worker.request("GET", "/jobs")[1]["jobs"]]
    assert job["id"] in ids and "nan0" not in ids and "sur0" not in ids
    assert worker.request("GET", "/jobs/nan0")[0] == 404


def test_ids_are_unguessable_and_only_the_same_request_is_merged(setup):
    worker, ckpt = setup
    worker.start()
    first = {"run": "r1", "checkpoint": str(ckpt), "step": 1}
    status, a, _ = worker.request("POST", "/jobs", first)
    assert status == 201
    assert a["id"] != hashlib.sha256(f"r1\0{ckpt}\0{1}".encode()).hexdigest()[:16]  # the old, guessable id
    status, again, _ = worker.request("POST", "/jobs", first)
    assert status == 200 and again["id"] == a["id"]  # the same request: the same job
    other = {**first, "evaluate": {"val_loss": False, "samples": {"prompts": ["hi"]}}}
    status, b, _ = worker.request("POST", "/jobs", other)
    assert status == 201 and b["id"] != a["id"] and b["evaluate"] != a["evaluate"]  # not pre-empted by the first


def test_state_is_private_under_umask_022(setup, tmp_path):
    worker, ckpt = setup
    old = os.umask(0o022)  # the worker subprocess inherits it
    try:
        worker.start()
    finally:
        os.umask(old)
    status, job, _ = worker.request("POST", "/jobs", {"run": "r1", "checkpoint": str(ckpt), "step": 1})
    assert status == 201
    state = tmp_path / "state"
    for path in (state, state / "jobs"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, oct(path.stat().st_mode)
    for path in (state / "jobs").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))


def test_a_nan_result_is_stored_as_null():
    from trainctl.remote.jobs import finite

    assert finite({"val_loss": float("nan"), "x": [float("inf"), 1.5], "s": "a"}) == {"val_loss": None, "x": [None, 1.5], "s": "a"}
