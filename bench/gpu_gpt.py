"""Step 1 of ``bench/gpu.sh``: GPT-2 small (124M, block 1024) on the ``gpt`` backend, bf16 and
``torch.compile``, through the real CLI: tokens/s and MFU against the GPU's bf16 peak.

    python bench/gpu_gpt.py --parallel ddp|fsdp [--smoke] [--results DIR] [--work DIR]

``--parallel`` sets ``train.parallel``: ``fsdp`` wraps the model in FSDP2 over a group of one;
``ddp`` in one process is no wrapper at all.

Data: tiny-shakespeare, byte-level (``trainctl prepare --tokenizer byte``: the GPT-2 BPE file
needs the network), with the vocabulary padded to GPT-2's 50304. The step's cost is set by the
model's shape (embedding and head included), not by which tokenizer made the ids.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import (  # noqa: E402
    ROOT, Cli, arguments, device_name, peak_tflops, rates, read_events, report, run_end, tail,
)

CONFIG = ROOT / "configs" / "gpt2_small.toml"  # GPT-2 small's shape: 12 x 768, 12 heads, block 1024
LOGGERS = 'plugins=["lr","controller","status","console","jsonl"]'  # no checkpoint: saves are step 3's

# (overrides, logged intervals skipped as warm-up). GPU: 60 steps logged every 10; the first two
# intervals hold compilation and the allocator's growth.
GPU = (["model.vocab_size=50304", "train.device=cuda", "train.dtype=bfloat16", "train.compile=true",
        "train.max_steps=60", "train.log_interval=10"], 2)
# CPU smoke: the same path, tiny sizes (the byte vocabulary unpadded), fp32 and no compile
# (compiling takes minutes on a CPU)
SMOKE = (["model.vocab_size=0", "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
          "train.device=cpu", "train.dtype=float32", "train.compile=false", "train.threads=1", "train.max_steps=6",
          "train.log_interval=2"], 1)


def prepare_data(work: Path, timeout: float) -> Path:
    """Byte-level tiny-shakespeare under ``work`` (once; steps 1 and 3 share it)."""
    data = work / "data-byte"
    if (data / "meta.json").exists():
        return data
    from trainctl.backends.gpt.data import embedded_text

    text = work / "tinyshakespeare.txt"
    text.write_text(embedded_text(), encoding="utf-8")
    proc = Cli(["prepare", str(text), "--out", str(data), "--tokenizer", "byte"]).run(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"trainctl prepare exited {proc.returncode}: {tail(proc.stderr)}")
    return data


def data_overrides(data: Path, batch: int) -> list[str]:
    return [f"data.path={json.dumps(str(data))}", f"train.batch_size={batch}", "train.grad_accum=1",
            "train.eval_interval=0", "train.eval_steps=1", "train.save_interval=0", "plugin.lr.warmup_steps=5"]


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], required=True)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 16 on a GPU, 4 in --smoke)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the training run")
    args = ap.parse_args()
    name = f"gpt-{args.parallel}"
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    gpu = device_name()
    peak = peak_tflops(gpu)
    sizes, skip = SMOKE if args.smoke else GPU
    batch = args.batch if args.batch is not None else (4 if args.smoke else 16)
    cli = Cli(["run", str(CONFIG), "--out", str(work / name), "--resume", "never", "--yes",
               "--set", f"train.parallel={args.parallel}"])
    result = {"parallel": args.parallel, "device": gpu, "smoke": args.smoke, "peak_tflops": peak, "batch_size": batch,
              "data": "tiny-shakespeare, byte-level" + ("" if args.smoke else "; vocabulary padded to GPT-2's 50304")}
    try:
        data = prepare_data(work, timeout=args.timeout)
        overrides = [*sizes, *data_overrides(data, batch), LOGGERS] + ([f"train.peak_tflops={peak}"] if peak else [])
        cli.args += [a for item in overrides for a in ("--set", item)]
        proc = cli.run(timeout=args.timeout)
        events = read_events(work / name)
        end = run_end(events)
        if proc.returncode != 0 or end["status"] != "completed":
            raise RuntimeError(f"trainctl run exited {proc.returncode} ({end['status']}: {end.get('reason', '')}): "
                               f"{tail(proc.stderr)}")
        start = next(e for e in events if e["event"] == "run_start")
        result |= {"status": "ok", "params": start["params"], "tokens_per_step": start["tokens_per_step"],
                   **rates(events, skip)}
    except Exception as exc:  # the step fails, the script does not: gpu.sh goes on to the next step
        result |= {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    result["command"] = cli.command()
    return report(args.results, name, result, line)


def line(r: dict) -> str:
    if r["status"] != "ok":
        return f"FAILED: {r['reason']}"
    mfu = (f"MFU {r['mfu']:.1%} of {r['peak_tflops']:g} TFLOPS bf16" if r["mfu"] is not None
           else "MFU: peak unknown for this device")
    return (f"{r['tokens_per_s']:,.0f} tokens/s, {mfu}, {r['step_time_s'] * 1000:.1f} ms/step "
            f"({r['tokens_per_step']:,} tokens/step, {r['params'] / 1e6:.1f}M params) on {r['device']}")


if __name__ == "__main__":
    sys.exit(main())
