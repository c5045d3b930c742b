"""Preemption and requeue on a real SLURM (a one-node cluster on this machine, see
tests/slurm_cluster.py). The shipped configs/slurm/train.sbatch trains a baby GPT; SIGUSR1
(what ``--signal=USR1@90`` sends every task before the time limit, here ``scancel
--signal=USR1``) makes it finish the step, save, ``scontrol requeue`` its own job and exit; SLURM
runs the script again, the run resumes from that checkpoint and completes, and its per-step
losses equal an uninterrupted run's, bit for bit. Never skipped: without SLURM it fails, saying
what to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_GPT, cli_env
from tests.live import sets
from tests.slurm_cluster import SlurmCluster, SlurmMissing
from trainctl.kernel.checkpoint_files import verify

SBATCH = ROOT / "configs" / "slurm" / "train.sbatch"
STEPS = 1500  # ~4 ms a step: long enough to be caught mid-run, short enough to finish twice
RUN = [*TINY_GPT, "train.threads=1", f"train.max_steps={STEPS}", "train.log_interval=1", "train.eval_interval=0",
       "plugin.lr.warmup_steps=5", f"plugin.lr.decay_steps={STEPS}"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            cluster.start()
        except SlurmMissing as exc:
            pytest.fail(f"no SLURM to test on: {exc}", pytrace=False)
        yield cluster
    finally:
        cluster.stop()


def test_a_preempted_job_requeues_resumes_and_trains_what_an_uninterrupted_run_trains(slurm, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    env = slurm.env() | cli_env_for_jobs() | {"TRAINCTL_OUT": str(out)}
    submitted = slurm_submit(slurm, env, "--output", str(log), "--chdir", str(tmp_path), str(SBATCH), *sets(*RUN))
    job = submitted.stdout.strip()

    step = wait_for(lambda: (n := last_step(out)) >= 50 and n, 60, f"job {job} never reached step 50", slurm, log)
    sent = time.time()
    slurm.client("scancel", "--signal=USR1", job)  # to the job's steps: srun's task is trainctl itself
    first_end = wait_for(lambda: run_ends(out)[:1] or None, 30, "the signalled run did not end", slurm, log)[0]
    assert (first_end["status"], first_end["reason"]) == ("stopped", "requeued"), first_end
    ledger = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()]
    saved = ledger[-1]
    assert saved["reason"] == "requeued" and step <= saved["step"] == first_end["step"] < STEPS
    print(f"job {job}: USR1 at step >= {step}, checkpoint of step {saved['step']} committed "
          f"{saved['time'] - sent:.2f} s later, run_end after {first_end['time'] - sent:.2f} s")

    # meanwhile (SLURM holds a requeued job back a few seconds) the same run, uninterrupted, outside SLURM
    whole = tmp_path / "whole"
    reference = subprocess_run([sys.executable, "-m", "trainctl", "run", "--yes", "--out", str(whole), *sets(*RUN)])

    ends = wait_for(lambda: (e := run_ends(out))[1:] and e, 60, f"job {job} was not requeued to completion", slurm, log)
    assert [(e["status"], e["reason"]) for e in ends] == [("stopped", "requeued"), ("completed", "")], ends
    wait_for(lambda: slurm.job(job).get("JobState") == "COMPLETED" or None, 30, f"job {job} did not complete", slurm, log)
    info = slurm.job(job)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "run_start"]
    assert [s["step"] for s in starts] == [0, saved["step"]] and starts[1]["resumed_from"] == saved["path"]
    assert any(e["event"] == "notice" and e["message"] == f"requeued SLURM job {job} (scontrol requeue {job})"
               for e in events)
    text = log.read_text()
    assert f"job {job} attempt 1" in text and f"job {job} attempt 2" in text, text  # --open-mode=append kept both
    assert verify(Path(saved["path"])) is None

    assert reference.wait(120) == 0, reference_output(reference)
    expected, got = losses(whole), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(expected) == list(range(1, STEPS + 1))
    assert got == expected  # exact float equality, every step, across the requeue


# --- helpers ------------------------------------------------------------------------------------


def cli_env_for_jobs() -> dict[str, str]:
    """What a user's job gets from their shell: this checkout's trainctl on PATH (sbatch passes
    the submitting environment on)."""
    env = cli_env()
    return {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", "PYTHONPATH": env["PYTHONPATH"],
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def slurm_submit(slurm: SlurmCluster, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["sbatch", "--parsable", *argv], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, f"sbatch exited {done.returncode}: {done.stderr}\n{slurm.logs()}"
    return done


def subprocess_run(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def reference_output(proc: subprocess.Popen) -> str:
    return proc.stderr.read() if proc.stderr else ""


def wait_for(probe, timeout: float, what: str, slurm: SlurmCluster, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    job_log = log.read_text(errors="replace")[-3000:] if log.exists() else "(no job output)"
    queue = slurm.client("squeue", "-h", "-o", "%i %T %r", check=False).stdout
    raise AssertionError(f"{what} within {timeout:.0f} s\nqueue: {queue}\njob output:\n{job_log}\n{slurm.logs()}")


def records(out: Path) -> list[dict]:
    """events.jsonl's complete lines (the run may be writing its last one)."""
    try:
        text = (out / "events.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def last_step(out: Path) -> int:
    steps = [e["step"] for e in records(out) if e["event"] == "step"]
    return steps[-1] if steps else 0


def run_ends(out: Path) -> list[dict]:
    return [e for e in records(out) if e["event"] == "run_end"]


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in records(out) if e["event"] == "step"}
