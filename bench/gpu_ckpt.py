"""Step 3 of ``bench/gpu.sh``: how long the training loop is blocked per checkpoint save of
GPT-2 small (1.5 GB: fp32 weights and AdamW's two moments), synchronous vs asynchronous
(``[plugin.checkpoint] async_save = true``), through the real CLI.

    python bench/gpu_ckpt.py [--smoke] [--results DIR] [--work DIR]

Time the loop loses to a save at step s, from ``events.jsonl``: the time from step s's event to
step s+1's, less the median of that interval between steps with no save around them. It counts
what the save blocks and anything it leaves to slow the next step (an async save's staging).
Every step is logged (one host sync each), so a step's time is its GPU work, not its launch.

The asynchronous run spaces its saves by twice the synchronous save time, so that a save never
waits for the previous one still in flight (that wait would be counted as blocked).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import (  # noqa: E402
    Cli, arguments, device_name, read_events, report, run_end, tail,
)
from bench.gpu_gpt import CONFIG, prepare_data  # noqa: E402

GPU = ["model.vocab_size=50304", "train.device=cuda", "train.dtype=bfloat16", "train.compile=false",
       "train.batch_size=8"]
SMOKE = ["model.vocab_size=0", "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
         "train.device=cpu", "train.dtype=float32", "train.compile=false", "train.threads=1", "train.batch_size=4"]
SYNC_INTERVAL, SAVES = 4, 3
MAX_ASYNC_INTERVAL = 200  # steps between async saves, at most (on a very slow disk the wait shows)


def blocking(events: list[dict], ledger: list[dict], interval: int) -> dict:
    """Per interval save: the seconds the loop lost to it (see the module doc). The save steps
    are the kernel's cadence; the ledger must hold a checkpoint for each (an async save may seal
    it, and send its "save" event, steps later)."""
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    saved = [s for s in sorted(steps) if s % interval == 0 and s + 1 in steps]
    written = {e["step"] for e in ledger}
    if not saved or not set(saved) <= written:
        raise RuntimeError(f"saves expected at steps {saved}, checkpoints written at {sorted(written)}")
    durations = {e["step"]: e["duration"] for e in events if e["event"] == "save" and e["reason"] == "interval"}

    def end_to_end(s: int) -> float:  # from step s's end to step s+1's end
        return steps[s + 1]["time"] - steps[s]["time"]

    plain = [end_to_end(s) for s in steps if s + 1 in steps and s not in saved and s > 1]
    step_s = statistics.median(plain) if plain else 0.0
    blocked = [end_to_end(s) - step_s for s in saved]
    return {
        "blocked_s_median": statistics.median(blocked), "blocked_s": [round(b, 4) for b in blocked],
        "save_event_duration_s": [round(durations[s], 4) for s in saved if s in durations],
        "step_time_s": step_s, "saves_measured": len(blocked),
    }


def measure(work: Path, sizes: list[str], interval: int, mode: str, timeout: float) -> dict:
    """One run with a save every ``interval`` steps; ``mode`` sync or async."""
    out = work / f"ckpt-{mode}"
    data = prepare_data(work, timeout=timeout)
    overrides = [*sizes, f"data.path={json.dumps(str(data))}", "train.grad_accum=1", "train.log_interval=1",
                 f"train.save_interval={interval}", f"train.max_steps={SAVES * interval + 2}", "train.eval_interval=0",
                 "train.eval_steps=1", "plugin.checkpoint.keep_last=1", "plugin.lr.warmup_steps=2", 'plugins=["defaults"]']
    overrides.append(f"plugin.checkpoint.async_save={'true' if mode == 'async' else 'false'}")
    cli = Cli(["run", str(CONFIG), "--out", str(out), "--resume", "never", "--yes",
               *[a for item in overrides for a in ("--set", item)]])
    proc = cli.run(timeout=timeout)
    events = read_events(out)
    end = run_end(events)
    if proc.returncode != 0 or end["status"] != "completed":
        raise RuntimeError(f"{mode} run exited {proc.returncode} ({end['status']}: {end.get('reason', '')}): "
                           f"{tail(proc.stderr)}")
    newest = max((out / "checkpoints").glob("step-*"))
    size = sum(p.stat().st_size for p in newest.iterdir() if p.is_file())
    ledger = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines() if line.strip()]
    return {"save_interval": interval, "checkpoint_mb": round(size / 1e6, 1), **blocking(events, ledger, interval),
            "command": cli.command()}


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for both runs together")
    args = ap.parse_args()
    name = "ckpt"
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = SMOKE if args.smoke else GPU
    result: dict = {"device": device_name(), "smoke": args.smoke, "sync": None, "async": None}
    try:
        deadline = time.monotonic() + args.timeout
        result["sync"] = measure(work, sizes, SYNC_INTERVAL, "sync", deadline - time.monotonic())
        sync = result["sync"]
        spacing = 2 * sync["blocked_s_median"] / max(sync["step_time_s"], 1e-6)
        interval = min(max(SYNC_INTERVAL, math.ceil(spacing) + 1), MAX_ASYNC_INTERVAL)
        result["async"] = measure(work, sizes, interval, "async", max(deadline - time.monotonic(), 1.0))
        result["async"]["spacing_capped"] = interval == MAX_ASYNC_INTERVAL  # then a save may wait for the last
        ratio = result["async"]["blocked_s_median"] / sync["blocked_s_median"]
        result |= {"status": "ok", "async_over_sync": ratio, "goal": "async blocked <= 20% of sync"}
    except Exception as exc:  # the step fails, the script does not: gpu.sh goes on
        result |= {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    return report(args.results, name, result, line)


def line(r: dict) -> str:
    if r["status"] != "ok":
        return f"FAILED: {r['reason']}"
    s, a = r["sync"], r["async"]
    return (f"sync save blocks the loop {s['blocked_s_median']:.3f} s per save ({s['checkpoint_mb']:,} MB, "
            f"{s['saves_measured']} saves, step {s['step_time_s'] * 1000:.1f} ms); "
            f"async {a['blocked_s_median']:.3f} s per save = {r['async_over_sync']:.0%} of sync (goal <= 20%)")


if __name__ == "__main__":
    sys.exit(main())
