"""nanoGPT's CPU baby GPT on tiny-shakespeare through the real CLI: final val loss (target
<= 1.89), median ms/step, time to the first step and peak memory (max RSS).

    .venv/bin/python bench/quality.py [--config configs/shakespeare_char.toml] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "shakespeare_char.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sets = [a for kv in args.overrides for a in ("--set", kv)]
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "trainctl", "run", args.config, "--yes",
               "--resume", "never", "--out", str(out), *sets]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        started = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    vals = [e for e in events if e["event"] == "eval" and e["split"] == "val"]
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    print(f"final val loss {vals[-1]['loss']:.4f} at step {vals[-1]['step']} (target <= 1.89)")
    print("val losses: " + ", ".join(f"{v['step']}:{v['loss']:.3f}" for v in vals))
    print(f"median ms/step {statistics.median(s['mean_step_time'] for s in steps) * 1e3:.2f}")
    print(f"time to first logged step {steps[0]['time'] - started:.2f} s (step {steps[0]['step']})")
    print(f"wall time {time.time() - started:.1f} s, peak RSS {rss_kb / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
