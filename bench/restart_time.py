"""Recovery after a fault, as a user sees it: a 2-rank torchrun run (gloo, the baby GPT) loses
a rank to ``kill -9`` (``--max-restarts=3``: torchrun restarts the group, the run resumes by
itself from its newest committed checkpoint); or, with ``--case node``, two agents
(``--nnodes=1:2``, c10d on loopback) lose the non-host node whole and the host re-forms the group
at world size 1; or, with ``--case join``, the host trains alone and a second agent joins mid-run
(torchrun stops the group with SIGTERM, trainctl saves, the group re-forms at world size 2).
Each trial reads the resumed run's ``recovery`` notice from events.jsonl (the time from the last
step before the fault to the first step after it, in phases) and, on this machine's clock, the
time from the fault (the SIGKILL, or the joining agent's start) to the first step after it; the
median of each is printed as a table.

    python bench/restart_time.py                                 # rank killed, 3 trials
    python bench/restart_time.py --case node --trials 3          # node lost, last_call_timeout 3 s
    python bench/restart_time.py --case node --trials 1 --last-call-timeout 30 --keep-alive 5,3   # torchrun's defaults
    python bench/restart_time.py --case join --trials 2
    python bench/restart_time.py --json r.json

The run saves every 20 steps and the fault comes at step 45 or later, so every kill also
retrains the steps since its checkpoint (5 or more); that lost work is not in the phases below
(the phases end at the first step after the resume) and is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainctl.hooks import notices  # noqa: E402  (neither imports torch: the runs do, this process does not)
from trainctl.kernel import recovery  # noqa: E402

BIN = Path(sys.executable).parent
PHASES = (*recovery.PHASES, "total_s")
KILL_AT = 45  # the fault comes at this step or just after; checkpoints every 20 steps
RUN = ["train.device='cpu'", "train.threads=1", "train.grad_accum=2", "train.save_interval=20",
       "train.eval_interval=0", "train.log_interval=1", "train.max_steps=100"]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def tree(pid: int) -> list[int]:
    """``pid`` and every process under it, from /proc (torchrun starts each rank in a session of
    its own, so a process group does not hold them)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [pid, *(p for c in children for p in tree(int(c)))]


def kill_tree(pid: int) -> None:
    for p in tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def status(out: Path) -> dict:
    try:
        return json.loads((out / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for_step(out: Path, procs: list[subprocess.Popen], step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (status(out).get("state") == "running" and status(out).get("step", 0) >= step):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a launcher exited ({[p.returncode for p in procs]}) before step {step}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"step {step} not reached in {timeout} s: {status(out)}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(args, cwd=ROOT, env=env() | (extra_env or {}), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def trainctl(out: Path) -> list[str]:
    return ["-m", "trainctl", "run", "--yes", "--out", str(out), *(a for s in RUN for a in ("--set", s))]


def rank_fault(work: Path, monitor_interval: float) -> tuple[Path, float, subprocess.Popen]:
    """torchrun --standalone, 2 ranks; one killed -9 (the agent's newest child, as tests/test_elastic.py picks it)."""
    out = work / "run"
    agent = launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=3",
                    f"--monitor-interval={monitor_interval}", *trainctl(out)], work / "agent.log")
    try:
        wait_for_step(out, [agent], KILL_AT, timeout=180)
        victim = max(tree(agent.pid)[1:])
        killed = time.time()
        os.kill(victim, signal.SIGKILL)
        return out, killed, agent
    except BaseException:
        kill_tree(agent.pid)
        raise


def node_fault(work: Path, monitor_interval: float, last_call: int, keep_alive: str,
               join: bool = False, shared_store: bool = False) -> tuple[Path, float, list[subprocess.Popen]]:
    """Two agents, one rank each, c10d rendezvous hosted by the first; the second killed whole,
    or (``join``) the host trains alone and the second agent joins mid-run. torch 2.13's agents
    share their TCPStore with the ranks, and then a node that joins a running group waits 60 s
    for a MASTER_ADDR that the old rank 0 never writes for the new round (it builds it once);
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 builds it every round (``shared_store``: leave torch's
    default, to see whether a newer torch still hangs)."""
    out, port = work / "run", free_port()
    extra = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if join and not shared_store else None
    interval, attempts = keep_alive.split(",")
    args = [str(BIN / "torchrun"), "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=3", f"--monitor-interval={monitor_interval}",
            f"--rdzv-conf=last_call_timeout={last_call},keep_alive_interval={interval},keep_alive_max_attempt={attempts}",
            *trainctl(out)]
    out.mkdir(parents=True)
    host = launch(args, work / "host.log", extra)
    other = None
    try:
        deadline = time.monotonic() + 60
        while True:  # the host binds the endpoint first, so it hosts the rendezvous store
            if host.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "host.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        if join:
            wait_for_step(out, [host], KILL_AT, timeout=180)
            joined = time.time()
            other = launch(args, work / "other.log", extra)
            return out, joined, [host, other]
        other = launch(args, work / "other.log")
        wait_for_step(out, [host, other], KILL_AT, timeout=180)
        killed = time.time()
        kill_tree(other.pid)
        other.wait()
        return out, killed, [host]
    except BaseException:
        kill_tree(host.pid)
        if other is not None:
            kill_tree(other.pid)
        raise


def trial(case: str, work: Path, monitor_interval: float, last_call: int, keep_alive: str,
          shared_store: bool = False) -> dict:
    if case == "rank":
        out, fault, agent = rank_fault(work, monitor_interval)
        agents = [agent]
    else:
        out, fault, agents = node_fault(work, monitor_interval, last_call, keep_alive, join=case == "join",
                                        shared_store=shared_store)
    try:
        code = max(abs(a.wait(300)) for a in agents)
    finally:
        for a in agents:
            kill_tree(a.pid)
    records = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    starts = [i for i, r in enumerate(records) if r.get("event") == "run_start"]
    notes = [r for r in records if r.get("event") == "notice" and r.get("kind") == notices.RECOVERY]
    if code != 0 or len(starts) != 2 or len(notes) != 1:
        raise RuntimeError(f"exit {code}, {len(starts)} run starts, {len(notes)} recovery notices; see {work}")
    resumed = records[starts[1]]
    first = next(r for r in records[starts[1]:] if r.get("event") == "step")
    last = [r for r in records[:starts[1]] if r.get("event") == "step"][-1]
    data = notes[0]["data"]
    return {**{k: data[k] for k in PHASES}, "last_step": data["last_step"], "resumed_at": resumed["start_step"],
            "world_size": resumed["world_size"], "restarts": data["restarts"],
            "fault_to_first_step_s": round(first["time"] - fault, 3),
            "last_step_to_fault_s": round(fault - last["time"], 3),
            "steps_retrained": data["last_step"] - resumed["start_step"]}


def table(rows: list[dict]) -> str:
    keys = [*PHASES, "fault_to_first_step_s", "steps_retrained"]
    lines = ["| phase | median | min | max |", "| --- | --- | --- | --- |"]
    for k in keys:
        values = [r[k] for r in rows]
        lines.append(f"| {k} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["rank", "node", "join"], default="rank")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--monitor-interval", type=float, default=0.1, help="torchrun's (its default: 0.1 s)")
    ap.add_argument("--last-call-timeout", type=int, default=3, help="c10d rendezvous, --case node/join (torchrun: 30 s)")
    ap.add_argument("--keep-alive", metavar="INTERVAL,ATTEMPTS",
                    help="c10d keep_alive_interval and keep_alive_max_attempt (torchrun's: 5,3); default 1,2 for "
                         "--case node (tests/test_elastic.py's), 5,3 for join: at 1,2 the joining agent formed "
                         "a group of its own in 3 of 3 tries here, which the run directory's lock refused")
    ap.add_argument("--shared-store", action="store_true",
                    help="--case join with torch's default TCPStore sharing (torch 2.13: the join hangs 60 s, both fail)")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it (logs of a failed trial)")
    ap.add_argument("--json", type=Path, help="write the trials here")
    args = ap.parse_args()
    args.keep_alive = args.keep_alive or ("5,3" if args.case == "join" else "1,2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="trainctl-restart-") as tmp:
        for i in range(args.trials):
            work = (args.keep or Path(tmp)) / f"trial-{i}"
            work.mkdir(parents=True)
            row = trial(args.case, work, args.monitor_interval, args.last_call_timeout, args.keep_alive,
                        args.shared_store)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"{args.case} fault, {args.trials} trials, monitor interval {args.monitor_interval} s"
          + (f", last_call_timeout {args.last_call_timeout} s, keep-alive {args.keep_alive}" if args.case != "rank" else ""))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
