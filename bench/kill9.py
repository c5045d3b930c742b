"""kill -9 at random moments of a run that saves a checkpoint every step; every restart must
resume from the newest complete checkpoint, never from a partial one, and the run that survives
all the kills must end bit-identical to one that was never interrupted.

    python bench/kill9.py --trials 200 --out /tmp/kill9    # the long version
    python bench/kill9.py --trials 20 --json r.json        # what tests/test_kill9.py runs

The parent imports torch once and forks a child per trial (no torch op runs in the parent, so the
children start clean); each child resumes with ``--resume auto`` semantics and trains until the
parent sends SIGKILL after a random delay. After each kill the parent verifies every checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402,F401  (imported once, before forking)
import torch._dynamo  # noqa: E402,F401  (the optimizer imports it lazily: 2 s per child otherwise)

from trainctl.cli.status import alive  # noqa: E402
from trainctl.control.files import read_json, write_json  # noqa: E402
from trainctl.kernel import config as cfg  # noqa: E402
from trainctl.kernel.registry import Registry  # noqa: E402
from trainctl.kernel.run import Run  # noqa: E402
from trainctl.kernel.checkpoint_files import TMP_PREFIX, checkpoints, verify  # noqa: E402

MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
         "train.batch_size=4", "train.device='cpu'", "train.threads=1", "optim.lr=3e-3"]


def config(out: Path, steps: int, keep_last: int, save_interval: int):
    overrides = [*MODEL, f"train.max_steps={steps}", f"train.save_interval={save_interval}", "train.log_interval=1000",
                 "train.eval_interval=0", "train.eval_steps=1", "plugin.lr.warmup_steps=10",
                 "plugin.lr.decay_steps=100000",  # fixed: max_steps may change between runs
                 'plugins=["lr", "controller", "checkpoint", "status"]', f"plugin.checkpoint.keep_last={keep_last}"]
    return cfg.load(None, Registry.discover(entry_points=False), overrides=overrides, out_dir=str(out))


def child(out: Path, steps: int, keep_last: int, trial_file: Path, save_interval: int) -> None:
    """Runs in the forked process: resume, say where from, train."""
    try:
        session = Run(config(out, steps, keep_last, save_interval), Registry.discover(entry_points=False), resume="auto")
        write_json(trial_file, {"resumed_from": session.resumed_from, "start_step": session.state.step})
        result = session.fit()
        code = 0 if result.status == "completed" else 1
    except BaseException as exc:  # noqa: BLE001 - report anything, then leave without cleanup
        print(f"child failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 3
    os._exit(code)


def fork_child(out: Path, steps: int, keep_last: int, trial_file: Path, children: list[int], save_interval: int = 1) -> int:
    pid = os.fork()
    if pid == 0:
        child(out, steps, keep_last, trial_file, save_interval)
    children.append(pid)
    return pid


def inspect(root: Path) -> dict:
    complete, corrupt = [], []
    for path in checkpoints(root):
        (corrupt if verify(path) else complete).append(int(path.name.removeprefix("step-")))
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] if root.is_dir() else []
    return {"complete": complete, "corrupt": corrupt, "leftovers": leftovers}


def weights_sha(out: Path, step: int) -> str:
    return hashlib.sha256((out / "checkpoints" / f"step-{step:06d}" / "model.safetensors").read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> dict:
    children: list[int] = []
    try:
        return run_trials(argv, children)
    finally:  # never leave a child training behind
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def run_trials(argv: list[str] | None, children: list[int]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100000, help="max_steps while killing")
    ap.add_argument("--tail", type=int, default=10, help="steps the survivor trains after the last kill")
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--max-delay", type=float, default=0.4, help="seconds after training starts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/trainctl-kill9"))
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    out, reference = args.out / "killed", args.out / "reference"
    out.mkdir(parents=True)
    root = out / "checkpoints"
    trials, problems = [], []
    started = time.perf_counter()
    expected_resume: int | None = None
    for trial in range(args.trials):
        trial_file = args.out / f"trial-{trial}.json"
        pid = fork_child(out, args.steps, args.keep_last, trial_file, children)
        while not trial_file.exists():  # the child is set up (and has chosen its checkpoint)
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:
                children.remove(pid)
                problems.append(f"trial {trial}: child exited {status} before training")
                break
            time.sleep(0.005)
        else:
            info = json.loads(trial_file.read_text())
            if info["start_step"] != (expected_resume or 0):
                problems.append(f"trial {trial}: resumed at {info['start_step']}, newest complete was {expected_resume}")
            delay = rng.uniform(0.0, args.max_delay)
            time.sleep(delay)
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:  # it completed the run before the kill
                children.remove(pid)
                trials.append({"trial": trial, "completed": True, **info})
                expected_resume = max(inspect(root)["complete"], default=None)
                break
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            children.remove(pid)
            state = inspect(root)
            status = read_json(out / "status.json") or {}
            state["status_state"] = status.get("state")
            if alive(out, status) is not False:
                problems.append(f"trial {trial}: trainctl status does not see that the run is gone")
            if state["corrupt"]:
                problems.append(f"trial {trial}: partial checkpoints under real names: {state['corrupt']}")
            expected_resume = max(state["complete"]) if state["complete"] else None
            trials.append({"trial": trial, "delay": round(delay, 3), **info, **state})
    # the survivor: resume one last time and train a few more steps (saving only at the end:
    # saving does not change training, and the kills are over)
    target = (expected_resume or 0) + args.tail
    last_file = args.out / "trial-final.json"
    pid = fork_child(out, target, args.keep_last, last_file, children, save_interval=0)
    _, status = os.waitpid(pid, 0)
    children.remove(pid)
    final = json.loads(last_file.read_text()) if last_file.exists() else {}
    if status != 0:
        problems.append(f"final run exited with status {status}")
    elif final.get("start_step") != (expected_resume or 0):
        problems.append(f"final run resumed at {final.get('start_step')}, newest complete was {expected_resume}")
    # the reference: the same run, never interrupted
    pid = fork_child(reference, target, args.keep_last, args.out / "reference.json", children, save_interval=0)
    _, ref_status = os.waitpid(pid, 0)
    children.remove(pid)
    identical = status == 0 and ref_status == 0 and weights_sha(out, target) == weights_sha(reference, target)
    if not identical:
        problems.append("the final weights differ from the uninterrupted run's")
    killed = [t for t in trials if not t.get("completed")]
    report = {
        "trials": len(trials),
        "kills": len(killed),
        "killed_mid_write": sum(1 for t in killed if t["leftovers"]),
        "resumes_from_checkpoint": sum(1 for t in trials if t.get("resumed_from")),
        "final_step": target,
        "final_identical_to_uninterrupted": identical,
        "problems": problems,
        "seconds": round(time.perf_counter() - started, 1),
        "detail": trials,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report.items() if k != "detail"}
    print(json.dumps(summary))
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
