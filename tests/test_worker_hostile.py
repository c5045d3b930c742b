"""Attacks on ``trainctl eval-worker`` by someone who can submit jobs (and write under a root),
each performed for real against a worker process on loopback: checkpoints made of links, FIFOs
and crafted manifests, configs that name files outside the roots or ask for hours of work, and
jobs that kill their evaluation. Hostile HTTP clients: test_worker_server.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.worker_process import Worker, copy_checkpoint, rehash, train

CKPT = Path("run") / "checkpoints" / "step-000010"
SLOW = 20_000  # evaluation batches: far longer than any time limit below
LIFT = ("--max-eval-steps", str(SLOW))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """``root`` (the worker's) holds a run; ``outside`` holds another run and prepared data."""
    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    train(root / "run", "train.max_steps=10", "train.save_interval=10", "train.eval_interval=0")
    train(outside / "run", "train.max_steps=10", "train.save_interval=10", "train.eval_interval=0", "seed=7")
    corpus = outside / "secret.txt"
    corpus.write_text("the secret corpus of another user. " * 400)
    run_cli("prepare", str(corpus), "--out", str(outside / "data"), check=True)
    return base


@pytest.fixture(scope="module")
def worker(base):
    w = Worker(base / "state", [base / "root"], args=("--job-timeout", "60")).start()
    yield w
    w.stop()


def submit(worker, checkpoint, step=10, run="r1"):
    return worker.request("POST", "/jobs", {"run": run, "checkpoint": str(checkpoint), "step": step})


def outcome(worker, checkpoint, step=10, run="r1", timeout=120):
    status, job, _ = submit(worker, checkpoint, step, run)
    assert status in (200, 201), job
    return worker.wait_job(job["id"], timeout=timeout)


def test_a_symlinked_file_inside_a_checkpoint_is_refused(base, worker):
    """Before: the worker followed model.safetensors -> a file outside the roots and evaluated it."""
    ckpt = copy_checkpoint(base / "root" / CKPT, base / "root" / "linked")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(base / "outside" / CKPT / "model.safetensors")
    rehash(ckpt, "model.safetensors")  # the manifest matches the outside file: only the link gives it away
    job = outcome(worker, ckpt)
    assert job["status"] == "error" and "model.safetensors is a symbolic link" in job["error"], job


def test_a_manifest_that_lists_nothing_does_not_verify(base, worker):
    """Before: {"files": {}} verified, and the backend then read whatever the names pointed at."""
    ckpt = base / "root" / "empty-manifest"
    ckpt.mkdir()
    for file in (base / "outside" / CKPT).iterdir():
        (ckpt / file.name).symlink_to(file)
    (ckpt / "manifest.json").unlink()
    (ckpt / "manifest.json").write_text(json.dumps({"step": 10, "files": {}}))
    job = outcome(worker, ckpt)
    assert job["status"] == "error" and "does not list config.toml, kernel.json" in job["error"], job
    # the kernel's files listed, the weights left out (and present: a link to someone else's)
    partial = copy_checkpoint(base / "root" / CKPT, base / "root" / "partial-manifest")
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k in ("config.toml", "kernel.json")}
    (partial / "manifest.json").write_text(json.dumps(manifest))
    (partial / "model.safetensors").unlink()
    (partial / "model.safetensors").symlink_to(base / "outside" / CKPT / "model.safetensors")
    job = outcome(worker, partial)
    assert job["status"] == "error" and "the manifest does not list model.safetensors, optimizer.pt" in job["error"], job


@pytest.mark.parametrize("name", ["/etc/hostname", "/no/such/file", "../../outside/secret.txt", "../../nothing"])
def test_manifest_names_that_leave_the_checkpoint_get_one_answer(base, worker, name):
    """Before: an absolute or ../ name gave "missing" or "does not match" depending on whether the
    file existed: an oracle for files outside the roots. Now the name itself is refused."""
    ckpt = copy_checkpoint(base / "root" / CKPT, base / "root" / f"oracle-{abs(hash(name))}")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    job = outcome(worker, ckpt)
    assert job["error"].endswith(f"the manifest lists {name!r}, which is not a plain file name in the checkpoint"), job


def test_a_checkpoint_swapped_after_verification_is_not_what_is_evaluated(base, tmp_path, monkeypatch):
    """The attacker replaces the checkpoint by a link to another one the moment it has been
    verified. Before: the backend loaded the other one. Now it loads the copy that was hashed."""
    from trainctl import evaluation
    from trainctl.kernel import checkpoint_files

    mine = copy_checkpoint(base / "root" / CKPT, tmp_path / "mine")
    theirs = base / "outside" / CKPT
    real_snapshot = checkpoint_files.snapshot

    def snapshot_then_swap(*args, **kw):
        manifest = real_snapshot(*args, **kw)
        mine.rename(tmp_path / "moved")
        mine.symlink_to(theirs, target_is_directory=True)
        return manifest

    monkeypatch.setattr(checkpoint_files, "snapshot", snapshot_then_swap)
    evaluator = evaluation.Evaluator(work_dir=tmp_path / "work", device="cpu")
    try:
        swapped = evaluator.evaluate(mine)
    finally:
        evaluator.close()
    original = json.loads(run_cli("eval", str(tmp_path / "moved"), "--json", check=True).stdout)
    other = json.loads(run_cli("eval", str(theirs), "--json", check=True).stdout)
    assert original["val_loss"] != other["val_loss"]
    assert swapped.val_loss == original["val_loss"]


@pytest.mark.parametrize("key, value", [
    ("data.path", "{outside}/data"),
    ("model.init_from", "{outside}/run/checkpoints/step-000010"),
    ("data.path", "{root}/../outside/data"),
])
def test_paths_in_the_checkpoints_config_are_confined_to_the_roots(base, worker, key, value):
    """Before: data.path outside the roots was opened, and the loss (and samples) came back."""
    value = value.format(outside=base / "outside", root=base / "root")
    ckpt = copy_checkpoint(base / "root" / CKPT, base / "root" / f"conf-{abs(hash(key + value))}", **{key: f"'{value}'"})
    job = outcome(worker, ckpt)
    assert job["status"] == "error" and f"names {key} = {value!r}, which is outside the worker's roots" in job["error"], job


def test_a_data_path_inside_the_roots_is_evaluated(base, worker):
    data = base / "root" / "data"
    if not data.exists():
        shutil.copytree(base / "outside" / "data", data)
    ckpt = copy_checkpoint(base / "root" / CKPT, base / "root" / "own-data", **{"data.path": "'../root/data'"})
    # relative paths resolve against the worker's working directory: confined all the same
    job = outcome(worker, ckpt)
    assert job["status"] == "error" and "outside the worker's roots" in job["error"]
    ckpt = copy_checkpoint(base / "root" / CKPT, base / "root" / "own-data-abs", **{"data.path": f"'{data}'"})
    job = outcome(worker, ckpt)
    # the roots allow it: the backend opens it (and finds a vocabulary that does not fit the model)
    assert "outside" not in (job["error"] or ""), job


def test_a_fifo_manifest_does_not_hang_the_worker(base, worker):
    """Before: opening the FIFO blocked the evaluation thread for good (and again after a restart)."""
    ckpt = copy_checkpoint(base / "root" / CKPT, base / "root" / "fifo")
    (ckpt / "manifest.json").unlink()
    os.mkfifo(ckpt / "manifest.json")
    started = time.monotonic()
    job = outcome(worker, ckpt, timeout=30)
    assert job["status"] == "error" and "manifest.json is not a regular file" in job["error"], job
    fifo_file = copy_checkpoint(base / "root" / CKPT, base / "root" / "fifo-file")
    (fifo_file / "optimizer.pt").unlink()
    os.mkfifo(fifo_file / "optimizer.pt")
    job = outcome(worker, fifo_file, timeout=30)
    assert "optimizer.pt is not a regular file" in job["error"], job
    assert time.monotonic() - started < 30
    assert outcome(worker, base / "root" / CKPT)["status"] == "done"  # and the next job runs


def test_a_config_that_asks_for_too_much_is_refused(base, worker):
    ckpt = copy_checkpoint(base / "root" / CKPT, base / "root" / "greedy", eval_steps=100_000_000)
    job = outcome(worker, ckpt, timeout=30)
    assert "train.eval_steps = 100000000, over the worker's limit of 1000 (--max-eval-steps)" in job["error"], job
    ckpt = copy_checkpoint(base / "root" / CKPT, base / "root" / "greedy-batch", **{"train.batch_size": "100000"})
    assert "train.batch_size = 100000, over the worker's limit" in outcome(worker, ckpt, timeout=30)["error"]


def child_pids(pid: int) -> list[int]:
    """The worker's evaluation processes (not multiprocessing's resource tracker)."""
    tasks = Path(f"/proc/{pid}/task")
    pids = [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_time_limit_and_attempt_cap(base):
    """A job longer than --job-timeout is stopped and is an error; a job whose evaluation process
    dies is retried until --max-attempts, then is an error; the worker goes on serving."""
    slow = copy_checkpoint(base / "root" / CKPT, base / "root" / "slow", eval_steps=SLOW)
    worker = Worker(base / "state-limits", [base / "root"], args=("--job-timeout", "8", "--max-attempts", "2", *LIFT)).start()
    try:
        started = time.monotonic()
        job = outcome(worker, slow, timeout=60)
        assert job["status"] == "error" and "took longer than 8s (the worker's --job-timeout)" in job["error"], job
        assert time.monotonic() - started < 45
        assert outcome(worker, base / "root" / CKPT)["status"] == "done"  # a fresh child took over

        status, job, _ = submit(worker, slow, run="killer")
        for attempt in (1, 2):
            deadline = time.monotonic() + 60
            while worker.request("GET", f"/jobs/{job['id']}")[1]["attempts"] < attempt or not child_pids(worker.proc.pid):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for pid in child_pids(worker.proc.pid):
                os.kill(pid, signal.SIGKILL)  # what an OOM kill looks like to the worker
        done = worker.wait_job(job["id"], timeout=60)
        assert done["status"] == "error" and done["attempts"] == 2, done
        assert "died (signal 9) in each of 2 attempts; not retried" in done["error"]
        assert worker.request("GET", "/health")[0] == 200
    finally:
        worker.stop()


def test_a_job_that_keeps_killing_the_worker_ends_as_an_error_across_restarts(base):
    slow = copy_checkpoint(base / "root" / CKPT, base / "root" / "slow-restart", eval_steps=SLOW)
    worker = Worker(base / "state-restarts", [base / "root"], args=("--max-attempts", "1", *LIFT)).start()
    try:
        job = submit(worker, slow)[1]
        worker.wait_job(job["id"], ("running",))
        worker.kill(signal.SIGKILL)
        worker.start()  # before: the job was queued again, forever
        done = worker.wait_job(job["id"], timeout=10)
        assert done["status"] == "error" and "not retried after 1 attempts" in done["error"], done
    finally:
        worker.stop()


def test_every_path_a_checkpoint_config_names_is_confined_to_the_roots(tmp_path):
    """The worker's policy over the config a checkpoint carries: each path key, nested tables too
    (``hf.dpo.ref_model``), is rewritten to its real path under a root, or refused."""
    from trainctl.kernel.errors import ConfigError
    from trainctl.remote.policy import PATH_KEYS, Limits, Policy
    from trainctl.remote.roots import Roots

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "model").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    policy = Policy(Roots([root]), Limits())
    assert ("hf.dpo", "ref_model", ("",)) in PATH_KEYS["hf"]
    raw = {"backend": "hf", "model": {"name_or_path": str(root / "model")}, "hf": {"dpo": {"ref_model": str(root / "model")}}}
    policy.check_config(raw)
    assert raw["hf"]["dpo"]["ref_model"] == os.path.realpath(root / "model")
    for planted in (str(outside), str(root / "link")):  # outside, or inside only by a symlink's name
        raw = {"backend": "hf", "model": {"name_or_path": str(root / "model")}, "hf": {"dpo": {"ref_model": planted}}}
        with pytest.raises(ConfigError, match="hf.dpo.ref_model"):
            policy.check_config(raw)


def test_a_lora_adapter_whose_base_model_lies_outside_the_roots_is_refused(tmp_path):
    """transformers loads an adapter directory's ``base_model_name_or_path`` as written: a model
    directory inside the roots must not pull a base model from outside them (or from the hub)."""
    from trainctl.kernel.errors import ConfigError
    from trainctl.remote.policy import Limits, Policy
    from trainctl.remote.roots import Roots

    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "base", root / "adapter", outside):
        d.mkdir(parents=True)
    policy = Policy(Roots([root]), Limits())
    for base, ok in ((root / "base", True), (outside, False), ("some-org/some-model", False)):
        (root / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
        raw = {"backend": "hf", "model": {"name_or_path": str(root / "adapter")}}
        if ok:
            policy.check_config(raw)
        else:
            with pytest.raises(ConfigError, match="base model of model.name_or_path's adapter"):
                policy.check_config(raw)


def test_data_file_patterns_and_oversized_eval_batches_in_a_checkpoint_config_are_refused(tmp_path):
    """``data.data_files`` are globs datasets resolves itself, so no path can be confined: a
    checkpoint whose config names them (``/etc/*``, say) is refused, as is an eval batch over the
    limit. An absent ``train.eval_steps`` is the schema's 20, not a whole split."""
    from trainctl.kernel.errors import ConfigError
    from trainctl.remote.policy import Limits, Policy
    from trainctl.remote.roots import Roots

    (tmp_path / "model").mkdir()
    policy = Policy(Roots([tmp_path]), Limits(max_batch_size=64))
    model = {"name_or_path": str(tmp_path / "model")}
    policy.check_config({"backend": "hf", "model": dict(model), "train": {"eval_batch_size": 64}})
    for key in ("data_files", "val_files"):
        raw = {"backend": "hf", "model": dict(model), "data": {"train": "json", key: ["/etc/*"]}}
        with pytest.raises(ConfigError, match=f"data.{key}, which the eval worker does not read"):
            policy.check_config(raw)
    with pytest.raises(ConfigError, match=r"train.eval_batch_size = 65, over the worker's limit of 64 \(--max-batch-size\)"):
        policy.check_config({"backend": "hf", "model": dict(model), "train": {"eval_batch_size": 65}})


def test_every_source_of_a_gpt_mixture_is_confined_to_the_roots(tmp_path):
    """``[[data.sources]]`` names a directory per source: each one is rewritten to its real path
    under a root, or the checkpoint is refused naming the source."""
    from trainctl.kernel.errors import ConfigError
    from trainctl.remote.policy import Limits, Policy
    from trainctl.remote.roots import Roots

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "web").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    policy = Policy(Roots([root]), Limits())
    raw = {"backend": "gpt", "data": {"sources": [{"path": str(root / "web"), "weight": 1.0}]}}
    policy.check_config(raw)
    assert raw["data"]["sources"][0]["path"] == os.path.realpath(root / "web")
    for planted in (str(outside), str(root / "link")):
        raw = {"backend": "gpt", "data": {"sources": [{"path": str(root / "web")}, {"path": planted}]}}
        with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.path = .*outside the worker's roots"):
            policy.check_config(raw)
    with pytest.raises(ConfigError, match="not a list of tables"):
        policy.check_config({"backend": "gpt", "data": {"sources": "x"}})
