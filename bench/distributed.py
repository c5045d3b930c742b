"""Distributed costs on this machine, 2 ranks (gloo, CPU), the baby GPT (the defaults):

1. the control agreement: one MAX all-reduce of 5 int flags per step, timed alone (``agree``
   called 2000 times in a 2-rank group) and set against the baby step time of a 2-rank run;
2. the baby step with ``train.control_interval`` 1 (the default: agree every step) vs 50;
3. SIGTERM to torchrun -> both ranks save the same step and exit.

    python bench/distributed.py [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
BABY = ["train.device='cpu'", "train.threads=1", "train.grad_accum=2", "train.eval_interval=0"]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def agree_worker(calls: int) -> None:
    """Run under torchrun: the cost of Group.agree with nothing decided (the common case)."""
    sys.path.insert(0, str(ROOT))
    from trainctl.hooks.events import Control
    from trainctl.kernel.distributed import Group
    from trainctl.kernel.run import distributed_from_env

    group = Group(distributed_from_env(), timeout_s=60)
    for _ in range(100):
        group.agree(Control())
    started = time.perf_counter()
    for _ in range(calls):
        group.agree(Control())
    per_call = (time.perf_counter() - started) / calls
    if group.rank == 0:
        print(json.dumps({"agree_us": per_call * 1e6}))
    group.close()


def agree_cost() -> float:
    proc = subprocess.run([*TORCHRUN, __file__, "--agree-worker"], env=env(), capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["agree_us"]


def step_ms(work: Path, interval: int, steps: int = 120) -> float:
    out = work / f"steps-{interval}-{time.time_ns()}"
    proc = subprocess.run([*TORCHRUN, "-m", "trainctl", "run", "--yes", "--out", str(out),
                    *sets([*BABY, f"train.max_steps={steps}", "train.log_interval=10", f"train.control_interval={interval}"])],
                   cwd=ROOT, env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"torchrun exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    times = [e["mean_step_time"] for e in events if e["event"] == "step" and e.get("loss") is not None and e["step"] > 20]
    return statistics.median(times) * 1000


def sigterm(work: Path) -> dict:
    out = work / f"sigterm-{time.time_ns()}"
    proc = subprocess.Popen([*TORCHRUN, "-m", "trainctl", "run", "--yes", "--out", str(out),
                             *sets([*BABY, "train.max_steps=1000000", "train.log_interval=1"])],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        try:
            status = json.loads((out / "status.json").read_text())
            if status.get("state") == "running" and status.get("step", 0) >= 5:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    elapsed = time.monotonic() - sent
    status = json.loads((out / "status.json").read_text())
    ckpt = Path(status["last_checkpoint"]["path"])
    return {"seconds": round(elapsed, 2), "state": status["state"], "step": status["step"],
            "saved_step": status["last_checkpoint"]["step"], "rank_files": sorted(p.name for p in ckpt.glob("rng-rank*.pt"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--agree-worker", action="store_true")
    args = parser.parse_args()
    if args.agree_worker:
        agree_worker(2000)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        agree = [agree_cost() for _ in range(args.trials)]
        every, rare = [], []
        for _ in range(args.trials):  # interleaved: the machine's load drifts
            every.append(step_ms(work, 1))
            rare.append(step_ms(work, 50))
        base = statistics.median(rare)
        result = {
            "agree_us_median": round(statistics.median(agree), 1),
            "baby_step_ms_interval1": [round(x, 2) for x in every],
            "baby_step_ms_interval50": [round(x, 2) for x in rare],
            "agree_share_of_step_pct": round(statistics.median(agree) / 1000 / base * 100, 3),
            "sigterm": [sigterm(work) for _ in range(args.trials)],
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
