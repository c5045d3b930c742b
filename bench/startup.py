"""Startup: wall time of ``trainctl --help`` (target <= 0.3 s; it must not import torch) and the
time from launching ``trainctl run`` to its first step event.

    .venv/bin/python bench/startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    python = [sys.executable, "-m", "trainctl"]
    help_times = [timed(python + ["--help"]) for _ in range(args.runs)]
    baseline = [timed([sys.executable, "-c", "pass"]) for _ in range(args.runs)]
    print(f"trainctl --help: median {statistics.median(help_times):.3f} s "
          f"(python -c pass: {statistics.median(baseline):.3f} s)")
    firsts = []
    for _ in range(max(args.runs // 3, 1)):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.time()
            subprocess.run(python + ["run", "--yes", "--out", tmp, "--set", "train.max_steps=3",
                                     "--set", "train.log_interval=1", "--set", "plugin.lr.warmup_steps=1"],
                           env=ENV, check=True, capture_output=True)
            first = next(json.loads(l) for l in Path(tmp, "events.jsonl").read_text().splitlines()
                         if '"event": "step"' in l)
            firsts.append(first["time"] - started)
    print(f"trainctl run -> first step (baby GPT, embedded data): median {statistics.median(firsts):.2f} s")


if __name__ == "__main__":
    main()
