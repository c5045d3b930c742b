"""SIGTERM to exit: how long a real `trainctl run` takes to finish its step, save a checkpoint
and exit after SIGTERM (torchrun and Kubernetes send SIGKILL 30 s after SIGTERM).

    python bench/sigterm.py                  # the baby GPT (defaults) and a GPT-2-small shape
    python bench/sigterm.py --models baby --trials 3
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
MODELS = {
    "baby": [],
    "gpt2": ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=256",
             "model.vocab_size=50304", "train.batch_size=1"],
}


def one(model: str, work: Path, threads: int) -> dict:
    out = work / f"{model}-{time.time_ns()}"
    sets = [a for item in [*MODELS[model], "train.device='cpu'", f"train.threads={threads}", "train.max_steps=1000000",
                           "train.eval_interval=0", "train.log_interval=1"] for a in ("--set", item)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "run", "--yes", "--out", str(out), *sets],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status_file = out / "status.json"
    while True:
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("state") == "running" and status.get("step", 0) >= 3:
            break
        if proc.poll() is not None:
            raise SystemExit(f"run exited early ({proc.returncode})")
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)
    exited = time.time() - sent
    ledger = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()]
    final = json.loads(status_file.read_text())
    return {"model": model, "exit_code": code, "state": final["state"], "signal_to_exit_s": round(exited, 2),
            "signal_to_saved_s": round(ledger[-1]["time"] - sent, 2), "save_s": ledger[-1]["seconds"],
            "reason": ledger[-1]["reason"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainctl-sigterm-") as tmp:
        for model in args.models:
            rows = [one(model, Path(tmp), args.threads) for _ in range(args.trials)]
            for row in rows:
                print(json.dumps(row), flush=True)
            exits = [r["signal_to_exit_s"] for r in rows]
            print(f"{model}: SIGTERM -> exit median {statistics.median(exits):.2f} s, max {max(exits):.2f} s "
                  f"(all stopped: {all(r['state'] == 'stopped' and r['exit_code'] == 0 for r in rows)})", flush=True)


if __name__ == "__main__":
    main()
