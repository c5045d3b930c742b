"""Elastic restarts under torchrun, for real (2 ranks, gloo): a rank killed -9 makes torchrun
restart the group (``--max-restarts``), and the run resumes by itself (``--resume auto``) from its
last checkpoint with the losses of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.live import LiveRun
from tests.test_distributed import SAME, env, losses, rank_pids

BIN = Path(sys.executable).parent
RUN = [*SAME, "train.max_steps=400", "train.grad_accum=2", "train.save_interval=20", "train.eval_interval=0"]


def check_recovery(out: Path, start_step: int, status: dict) -> dict:
    """The resumed run's ``recovery`` notice: every phase measured, none negative, their sum the
    total, the last step before the fault at or after the checkpoint it resumed from."""
    notes = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if '"recovery"' in line]
    assert len(notes) == 1, notes
    data = notes[0]["data"]
    phases = [data[k] for k in ("down_s", "process_start_s", "rendezvous_s", "setup_s", "checkpoint_load_s", "first_step_s")]
    assert all(isinstance(v, float) and v >= 0 for v in phases), data
    assert abs(sum(phases) - data["total_s"]) < 1e-6 and 0 < data["total_s"] < 120, data
    assert data["last_step_source"] == "events" and data["last_step"] >= start_step, data
    assert notes[0]["step"] == start_step + 1 and status["recovery"] == data
    return data


def test_a_rank_killed_under_torchrun_restarts_and_resumes_with_the_same_losses(tmp_path):
    elastic = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    run = LiveRun(tmp_path / "run", *RUN, model=[], launcher=elastic)
    try:
        run.wait(lambda s: s.get("state") == "running" and s["step"] >= 45, timeout=120)
        victim = max(rank_pids(run.proc.pid))  # a rank, not the agent
        os.kill(victim, signal.SIGKILL)
        assert run.proc.wait(120) == 0, run.output()
    finally:
        run.close()
    status = run.status()
    assert status["state"] == "completed" and status["step"] == 400, (status, run.output()[-3000:])
    starts = [json.loads(line) for line in (run.out / "events.jsonl").read_text().splitlines() if '"run_start"' in line]
    assert [s["start_step"] > 0 for s in starts] == [False, True], starts  # one restart, from a checkpoint
    assert [s["restarts"] for s in starts] == [0, 1] and status["restarts"] == 1, starts
    check_recovery(run.out, starts[1]["start_step"], status)
    ref = tmp_path / "ref"
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainctl", "run", "--yes",
                           "--out", str(ref), *[a for s in RUN for a in ("--set", s)]],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run.out) == losses(ref)
