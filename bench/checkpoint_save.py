"""Checkpoint save time, end to end through the checkpoint plugin (write to a temporary
directory, sha256 manifest, fsync every file, rename, ledger), with the parts timed apart.

    python bench/checkpoint_save.py                 # baby GPT (4x128) and GPT-2 small shape (124M)
    python bench/checkpoint_save.py --models baby --repeat 5

Prints one JSON line per model and a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {
    "baby": [],  # the defaults: nanoGPT's CPU baby GPT, 4 layers x 128, block 64
    "gpt2": ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024",
             "model.vocab_size=50304", "train.batch_size=1"],
}


def measure(name: str, repeat: int, work: Path) -> dict:
    from trainctl.kernel import config as cfg
    from trainctl.kernel.registry import Registry
    from trainctl.kernel.run import Run
    from trainctl.kernel.checkpoint_files import fsync_path, sha256_file

    registry = Registry.discover(entry_points=False)
    out = work / name
    overrides = [*MODELS[name], "train.device='cpu'", "plugins=['checkpoint']", "plugin.checkpoint.keep_last=1"]
    session = Run(cfg.load(None, registry, overrides=overrides, out_dir=str(out)), registry, resume="never")
    session.backend.train_step(0)  # optimizer state exists after the first update
    session.state.step = 1
    totals = []
    for i in range(repeat):
        session.state.step = i + 1
        started = time.perf_counter()
        path = session.bus.write_checkpoint(session.state.step, "bench", lambda d: session.write_state(d, session.state))
        totals.append(time.perf_counter() - started)
    size = sum(p.stat().st_size for p in path.iterdir())

    parts = {"write": [], "sha256": [], "fsync": []}
    for _ in range(repeat):
        scratch = work / f"{name}-parts"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        t0 = time.perf_counter()
        session.write_state(scratch, session.state)
        t1 = time.perf_counter()
        files = [p for p in scratch.iterdir()]
        for p in files:
            sha256_file(p)
        t2 = time.perf_counter()
        for p in files:
            fsync_path(p)
        t3 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[key].append(value)
    session.backend.close()
    shutil.rmtree(out, ignore_errors=True)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "model": name, "params": session.plan.params, "checkpoint_mb": round(size / 1e6, 1),
        "save_s_median": round(median(totals), 3), "save_s_min": round(min(totals), 3),
        "write_s": round(median(parts["write"]), 3), "sha256_s": round(median(parts["sha256"]), 3),
        "fsync_s": round(median(parts["fsync"]), 3), "repeat": repeat,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trainctl-ckpt-bench-", dir=args.dir))
    rows = []
    try:
        for name in args.models:
            row = measure(name, args.repeat, work)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| model | params | checkpoint | save (median) | write | sha256 | fsync |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['checkpoint_mb']} MB | {r['save_s_median']} s | "
              f"{r['write_s']} s | {r['sha256_s']} s | {r['fsync_s']} s |")
    print(f"\n(cpu count {os.cpu_count()}, {args.repeat} saves each)")


if __name__ == "__main__":
    main()
