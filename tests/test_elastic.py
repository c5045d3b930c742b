"""Elastic restarts under torchrun, for real (gloo, loopback): a rank killed -9 makes torchrun
restart the group (``--max-restarts``), and the run resumes by itself (``--resume auto``) from its
last checkpoint with the losses of an uninterrupted run, bit for bit; with two agents
(``--nnodes=1:2``, c10d rendezvous) a node killed whole re-forms the group at world size 1.

What torchrun 2.13 does, found by trying it: each worker runs in its own session
(``SubprocessHandler`` passes ``start_new_session``), so killing an agent's process group leaves
its rank training; a node dying is the agent and every process under it. The c10d rendezvous
host is the agent that binds ``--rdzv-endpoint`` first. After the fault the host's rank fails in
its next collective ("Connection reset by peer"), its agent re-runs the rendezvous, which closes
at the minimum of 1 node after ``last_call_timeout`` (30 s by default, 3 s here)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT
from tests.live import LiveRun
from tests.live import sets
from tests.test_distributed import SAME, env, losses, rank_pids

BIN = Path(sys.executable).parent
STEPS = ["train.grad_accum=2", "train.save_interval=20", "train.eval_interval=0"]
RUN = [*SAME, "train.max_steps=400", *STEPS]
NODE_RUN = [*SAME, "train.max_steps=300", *STEPS]  # ~6 s at 2 ranks: the rendezvous dominates


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """``pid`` and every process under it, from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for c in children for p in tree(int(c)))]


def run_starts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if '"run_start"' in line]


def test_a_node_killed_whole_reforms_the_group_at_world_size_1_and_completes(tmp_path):
    out, port = tmp_path / "run", free_port()
    agent = [str(BIN / "torchrun"), "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=3",
             "--rdzv-conf=last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=2",
             "-m", "trainctl", "run", "--yes", "--out", str(out), *sets(*NODE_RUN)]
    out.mkdir()
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("host", "other")]
    host = subprocess.Popen(agent, cwd=ROOT, env=env(), stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)
    agents = [host]
    try:
        deadline = time.monotonic() + 60
        while True:  # the host binds the rendezvous endpoint before the other agent joins it
            assert host.poll() is None and time.monotonic() < deadline, (tmp_path / "host.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        other = subprocess.Popen(agent, cwd=ROOT, env=env(), stdout=logs[1], stderr=subprocess.STDOUT,
                                 start_new_session=True)
        agents.append(other)
        status = {}
        while status.get("step", 0) < 45:
            assert host.poll() is None and other.poll() is None and time.monotonic() < deadline + 60, status
            try:
                status = json.loads((out / "status.json").read_text())
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        for pid in tree(other.pid):  # the node, whole: its agent and its rank
            os.kill(pid, signal.SIGKILL)
        assert host.wait(120) == 0, (tmp_path / "host.log").read_text()[-3000:]
    finally:
        for proc in agents:
            if proc.poll() is None:
                for pid in tree(proc.pid):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 300, status
    starts = run_starts(out)
    assert [(s["world_size"], s["restarts"]) for s in starts] == [(2, 0), (1, 1)], starts
    resumed = starts[1]["start_step"]
    assert resumed >= 40 and resumed % 20 == 0 and starts[1]["resumed_from"].endswith(f"step-{resumed:06d}"), starts
    check_recovery(out, resumed, status)
    # the reference: one process, resumed from the same checkpoint in a run directory of its own
    ref = tmp_path / "ref"
    shutil.copytree(starts[1]["resumed_from"], ref / "checkpoints" / f"step-{resumed:06d}")
    proc = subprocess.run([sys.executable, "-m", "trainctl", "run", "--yes", "--out", str(ref),
                           *sets(*NODE_RUN)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_starts(ref)[0]["start_step"] == resumed
    after = {step: loss for step, loss in losses(out).items() if step > resumed}  # the resumed attempt's
    assert len(after) == 300 - resumed and after == losses(ref)


GROUP_OF_TWO = """
import os, torch
from trainctl.kernel.backend import Distributed
from trainctl.kernel.distributed import Group
rank = int(os.environ["RANK"])
group = Group(Distributed(rank=rank, local_rank=0, world_size=2), timeout_s=15)
print(group.mean_(torch.tensor([float(rank)])).item())
"""


def test_ranks_of_agents_with_different_restart_counts_form_one_group(tmp_path):
    """A node that joins after a node was lost: the survivor's ranks run attempt 1 (torchrun
    counts its failure restart), the newcomer's attempt 0 (a fresh agent; torch 2.13 does not
    count a membership change). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the agent's store
    not shared: TORCHELASTIC_USE_AGENT_STORE=False) rank 0 hosts a new store every round, so the
    ranks must meet in it whatever their counts; a per-attempt prefix hung them until the timeout."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", GROUP_OF_TWO], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=env() | {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                           "TORCHELASTIC_USE_AGENT_STORE": "False",
                                           "TORCHELASTIC_RESTART_COUNT": str(count)})
             for rank, count in ((0, 1), (1, 0))]
    outputs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [o.split()[-1] for o in outputs] == ["0.5", "0.5"], outputs
