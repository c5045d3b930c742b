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
    ref = tmp_path / "ref"
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainctl", "run", "--yes",
                           "--out", str(ref), *[a for s in RUN for a in ("--set", s)]],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run.out) == losses(ref)
