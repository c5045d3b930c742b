"""Synchronous checkpoint save time vs the time the loop is blocked by an async save, 2 ranks
under torchrun (gloo on CPU, nccl on GPUs), DDP and FSDP, through the real CLI and the
checkpoint plugin's ledger (``seconds``: the whole save; ``blocked_seconds``: what the loop
waited for, async only).

    python bench/async_save.py                      # GPT-2 small shape (124M), block 64
    python bench/async_save.py --model baby --saves 5

Goal (issue 11): blocked <= 20 % of the synchronous save on the GPT-2 small shape. Prints one
JSON line per (strategy, mode) and a markdown table for docs/benchmarks.md. The first save of a
run allocates the staging buffers and is left out of the medians.

FSDP: ``train.parallel = "fsdp"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "baby": [],  # nanoGPT's CPU baby GPT, 4 x 128
    "gpt2": ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=64",
             "model.vocab_size=50304", "model.dropout=0.0"],
}


def one(strategy: str, mode: str, model: str, saves: int, work: Path) -> dict:
    out = work / f"{strategy}-{mode}"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    overrides = [*MODELS[model], "train.batch_size=1", "train.grad_accum=2", f"train.max_steps={saves}",
                 "train.save_interval=1", "train.eval_interval=0", "train.log_interval=1", "train.threads=1",
                 "plugin.checkpoint.keep_last=2", f"plugin.checkpoint.async_save={str(mode == 'async').lower()}"]
    entry = [*torchrun, "-m", "trainctl"]
    overrides.append(f"train.parallel='{strategy}'")
    sets = [arg for o in overrides for arg in ("--set", o)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([*entry, "run", "--yes", "--out", str(out), *sets], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{strategy} {mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    ledger = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()][1:]
    size = sum(p.stat().st_size for p in Path(ledger[-1]["path"]).iterdir())
    shutil.rmtree(out, ignore_errors=True)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "strategy": strategy, "mode": mode, "model": model, "checkpoint_mb": round(size / 1e6, 1),
        "save_s": round(median([r["seconds"] for r in ledger]), 3),
        "blocked_s": round(median([r.get("blocked_seconds", r["seconds"]) for r in ledger]), 3),
        "saves": len(ledger),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", choices=list(MODELS))
    ap.add_argument("--saves", type=int, default=4, help="saves per run (one per step); the first is left out")
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trainctl-async-bench-", dir=args.dir))
    rows = []
    try:
        for strategy in args.strategies:
            for mode in ("sync", "async"):
                row = one(strategy, mode, args.model, args.saves, work)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| strategy | model | checkpoint | sync save | async: loop blocked | blocked / sync |")
    print("|---|---|---:|---:|---:|---:|")
    for strategy in args.strategies:
        sync, asy = (next(r for r in rows if r["strategy"] == strategy and r["mode"] == m) for m in ("sync", "async"))
        print(f"| {strategy} | {args.model} | {sync['checkpoint_mb']} MB | {sync['save_s']} s | "
              f"{asy['blocked_s']} s (whole save {asy['save_s']} s) | {asy['blocked_s'] / sync['save_s']:.0%} |")
    print(f"\n(2 ranks, cpu count {os.cpu_count()}, median of {args.saves - 1} saves each)")


if __name__ == "__main__":
    main()
