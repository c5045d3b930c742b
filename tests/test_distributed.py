"""Distributed runs on this CPU: 2 ranks under torchrun and accelerate launch (gloo), for real.

DDP equals gradient accumulation step by step; one writer of the run's shared files; every rank
stops, saves and pauses at the same step (SIGTERM to the launcher, `trainctl ctl`); checkpoints
hold every rank's files and resume across world sizes (2 -> 1, 1 -> 2) on the same data order;
a rank that dies or hangs fails the run within the configured timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, run_cli
from tests.live import FAST, LiveRun, sets
from trainctl.kernel.checkpoint_files import checkpoints, verify

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
ACCELERATE = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
# a fixed lr schedule (not tied to max_steps), so runs of different lengths train alike
SAME = [*FAST, "plugin.lr.decay_steps=1000", "train.log_interval=1", "train.eval_steps=2"]
LONG = [*SAME, "train.max_steps=1000000", "train.log_interval=5", "train.eval_interval=0"]


def env() -> dict[str, str]:
    return cli_env() | {"OMP_NUM_THREADS": "1"}


def launch(launcher: list[str], out: Path, *overrides: str, module: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    entry = ["-m", "trainctl"] if module else ["trainctl"]
    proc = subprocess.run(
        [*launcher, *entry, "run", "--yes", "--out", str(out), *sets(*SAME, *overrides)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def single(out: Path, *overrides: str) -> None:
    run_cli("run", "--yes", "--out", str(out), *sets(*SAME, *overrides), check=True)


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(out) if e["event"] == "step" and e.get("loss") is not None}


def evals(out: Path) -> dict[tuple[int, str], float]:
    return {(e["step"], e["split"]): e["loss"] for e in events(out) if e["event"] == "eval"}


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= tol, f"largest difference {worst:.2e}: {a} vs {b}"


def test_ddp_two_ranks_equal_one_process_with_gradient_accumulation(tmp_path):
    steps = ["train.max_steps=8", "train.eval_interval=4"]
    single(tmp_path / "one", *steps, "train.grad_accum=4")
    launch(TORCHRUN, tmp_path / "ddp", *steps, "train.grad_accum=4")  # 2 ranks x 2 micro-batches
    assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "one"))
    assert_close(evals(tmp_path / "ddp"), evals(tmp_path / "one"))
    assert len(losses(tmp_path / "one")) == 8

    # exactly one writer of the shared files: one run_start, one line per step, one run_end
    ev = events(tmp_path / "ddp")
    assert [e["event"] for e in ev].count("run_start") == 1 and [e["event"] for e in ev].count("run_end") == 1
    assert [e["step"] for e in ev if e["event"] == "step"] == list(range(1, 9))
    status = json.loads((tmp_path / "ddp" / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 8
    assert len((tmp_path / "ddp" / "checkpoints.jsonl").read_text().splitlines()) == 1
    assert not list((tmp_path / "ddp").glob("*.tmp*")) and not list((tmp_path / "ddp").glob(".status*"))
    # tokens per step: batch_size x grad_accum x block_size, whatever the number of ranks
    start = next(e for e in ev if e["event"] == "run_start")
    assert start["tokens_per_step"] == 8 * 4 * 32 and start["world_size"] == 2

    # the checkpoint holds every rank's RNG and its manifest lists them
    [ckpt] = checkpoints(tmp_path / "ddp" / "checkpoints")
    assert verify(ckpt) is None
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"rng-rank0.pt", "rng-rank1.pt", "model.safetensors", "kernel.json"} <= set(manifest)


def test_accelerate_launch_from_the_repository_root_and_resume_one_to_two(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 trainctl run` (the package directory)
    resumes a single-process checkpoint with 2 ranks on the same data order."""
    single(tmp_path / "ref", "train.max_steps=6", "train.grad_accum=2")
    single(tmp_path / "run", "train.max_steps=3", "train.grad_accum=2")
    launch(ACCELERATE, tmp_path / "run", "train.max_steps=6", "train.grad_accum=2", module=False)
    starts = [e for e in events(tmp_path / "run") if e["event"] == "run_start"]
    assert [s["world_size"] for s in starts] == [1, 2] and starts[1]["resumed_from"].endswith("step-000003")
    assert_close(losses(tmp_path / "run"), losses(tmp_path / "ref"))


def rank_pids(launcher_pid: int) -> list[int]:
    """The launcher's child processes (the ranks), from /proc."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    return [int(c) for c in children]


@pytest.fixture
def live(tmp_path):
    runs = []

    def start(name, *overrides, **kw):
        run = LiveRun(tmp_path / name, *overrides, model=[], launcher=TORCHRUN, **kw)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def test_sigterm_to_torchrun_saves_the_same_step_on_every_rank_and_resumes_with_one(live, tmp_path):
    run = live("run", *LONG, "train.grad_accum=2")
    run.wait(lambda s: s["state"] == "running" and s["step"] >= 10, timeout=120)
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    run.proc.wait(60)
    elapsed = time.monotonic() - sent
    assert elapsed < 25, f"SIGTERM to exit took {elapsed:.1f} s\n{run.output()}"
    print(f"2 ranks: SIGTERM to exit in {elapsed:.2f} s")
    status = run.status()
    assert status["state"] == "stopped" and status["reason"] == "signal", (status, run.output())
    [saved] = [r for r in run.ledger() if r["reason"] == "signal"]
    step = saved["step"]
    assert step == status["step"]
    ckpt = Path(saved["path"])
    assert verify(ckpt) is None and {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "kernel.json").read_text())["state"]["step"] == step

    # 2 -> 1: the resumed run continues the same global data order as an uninterrupted run
    end = step + 3
    single(tmp_path / "run", *LONG[:-3], f"train.max_steps={end}", "train.grad_accum=2")
    single(tmp_path / "ref", *LONG[:-3], f"train.max_steps={end}", "train.grad_accum=2")
    resumed = {k: v for k, v in losses(tmp_path / "run").items() if k > step}
    reference = {k: v for k, v in losses(tmp_path / "ref").items() if k > step}
    assert resumed and len(resumed) == 3
    assert_close(resumed, reference)


def test_ctl_pause_resume_and_stop_reach_every_rank(live):
    run = live("run", *LONG, "train.grad_accum=2")
    run.wait(lambda s: s["state"] == "running" and s["step"] >= 3, timeout=120)
    assert run_cli("ctl", str(run.out), "pause", timeout=60).returncode == 0
    paused = run.wait(lambda s: s["state"] == "paused", timeout=60)
    time.sleep(1.5)
    assert run.status()["step"] == paused["step"]  # both ranks hold: rank 1 alone would deadlock rank 0's next step
    assert run_cli("ctl", str(run.out), "resume", timeout=60).returncode == 0
    run.wait(lambda s: s["state"] == "running" and s["step"] >= paused["step"] + 5, timeout=60)
    assert run_cli("ctl", str(run.out), "stop", timeout=60).returncode == 0
    assert run.proc.wait(60) == 0, run.output()
    status = run.status()
    assert status["state"] == "stopped", status
    ckpt = Path(run.ledger()[-1]["path"])
    assert verify(ckpt) is None and {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "manifest.json").read_text())["step"] == status["step"]
    kinds = [e.get("kind") for e in run.events() if e["event"] == "notice"]
    assert kinds.count("paused") == 1 and kinds.count("resumed") == 1  # one writer


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_fails_the_run_within_the_timeout(live, how):
    timeout = 8
    run = live("run", *LONG, "train.grad_accum=2", f"train.dist_timeout_s={timeout}")
    status = run.wait(lambda s: s["state"] == "running" and s["step"] >= 5, timeout=120)
    rank0 = status["pid"]
    [rank1] = [p for p in rank_pids(run.proc.pid) if p != rank0]
    hit = time.monotonic()
    os.kill(rank1, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        run.wait(lambda s: s["state"] == "failed", timeout=timeout + 30)
    finally:
        if how == "hang":
            os.kill(rank1, signal.SIGCONT)
    elapsed = time.monotonic() - hit
    print(f"rank 1 {how}: rank 0 failed in {elapsed:.2f} s: {run.status()['reason'][:300]}")
    assert elapsed < timeout + 20
    reason = run.status()["reason"]
    assert reason, run.status()
    if how == "hang":  # nothing told rank 0 but the collective's timeout
        assert "stopped answering" in reason and "Timed out" in reason, reason
    assert "another rank died" in reason, reason
    assert run.proc.wait(60) != 0


HF_TOLERANCE = 1e-4  # float32 on CPU; the reductions run in another order than one process's


@pytest.mark.parametrize("launcher", [TORCHRUN, ACCELERATE], ids=["torchrun", "accelerate"])
def test_hf_backend_two_ranks_equal_one_process(hf, tmp_path, launcher):
    """2 ranks x 1 micro-batch = 1 process x grad_accum 2, with the step's loss normalised by the
    GLOBAL trained-token count (TRL's num_items_in_batch) on both; under either launcher."""
    steps = ["train.max_steps=4", "plugin.lr.warmup_steps=1", "train.eval_interval=2"]
    base = [*hf.sets(None, *steps)]
    run_cli("run", "--yes", "--backend", "hf", "--out", str(tmp_path / "one"), *sets(*base), check=True, timeout=300)
    proc = subprocess.run(
        [*launcher, "-m", "trainctl", "run", "--yes", "--backend", "hf", "--out", str(tmp_path / "ddp"), *sets(*base)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, ddp = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    print("hf 2 ranks vs 1 process, largest step-loss difference:", max(abs(one[k] - ddp[k]) for k in one))
    assert_close(ddp, one, HF_TOLERANCE)
    assert_close(evals(tmp_path / "ddp"), evals(tmp_path / "one"), HF_TOLERANCE)
    [ckpt] = checkpoints(tmp_path / "ddp" / "checkpoints")
    assert verify(ckpt) is None and {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in ckpt.iterdir()}


def test_a_failed_write_on_one_rank_leaves_the_previous_checkpoint_newest(tmp_path):
    """Rank 1's disk is full when step 4 is saved (its rng-rank1.pt fails): every rank fails with
    the same message, the temporary directory is gone, and step-000002 is still the newest."""
    out = tmp_path / "run"
    single(out, "train.max_steps=2", "train.grad_accum=2")
    proc = subprocess.run(
        [*TORCHRUN, str(ROOT / "tests" / "small_files_rank.py"), "run", "--yes", "--out", str(out),
         *sets(*SAME, "train.max_steps=4", "train.grad_accum=2")],
        cwd=ROOT, env=env() | {"SMALL_FILES_RANK": "1"}, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    failures = [line for line in proc.stderr.splitlines() if line.startswith("trainctl: run failed at step 4")]
    assert len(failures) == 2, proc.stderr[-3000:]  # one per rank, the same words
    assert failures[0] == failures[1]
    assert f"could not write checkpoint step-000004 in {out / 'checkpoints'}: rank 1: " in failures[0]
    assert "rank 0:" not in failures[0] and "the earlier checkpoint step-000002 is intact" in failures[0]
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # no partial checkpoint, no temporary
    assert verify(root / "step-000002") is None
    assert [json.loads(line)["step"] for line in (out / "checkpoints.jsonl").read_text().splitlines()] == [2]
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    # and the run resumes from it
    single(out, "train.max_steps=4", "train.grad_accum=2")
    assert [p.name for p in checkpoints(root)] == ["step-000002", "step-000004"]
