"""What skipping non-finite updates costs per step: the gpt backend's ``train_step`` (device-side
finite check, fused AdamW's found_inf, skip counters) against the same step written without
them (clip, then step: the loop before the loss guard), alternating, on the same model.

    python bench/step_overhead.py                       # baby GPT, 200 steps each, 1 thread
    python bench/step_overhead.py --steps 300 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def plain_step(backend, step: int) -> None:
    """The update without any finiteness handling."""
    import torch

    backend.optimizer.zero_grad(set_to_none=True)
    for m in backend.micro:
        x, y = backend._batch("train", backend._draw("train", step, m))
        _, loss = backend.eval_model(x, y)
        (loss / len(backend.micro)).backward()
    torch.nn.utils.clip_grad_norm_(backend.params, backend.train.grad_clip, foreach=True)
    backend.optimizer.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from trainctl.kernel import config as cfg
    from trainctl.kernel.registry import Registry
    from trainctl.kernel.run import Run

    registry = Registry.discover(entry_points=False)
    overrides = ["train.device='cpu'", f"train.threads={args.threads}", "plugins=[]"]
    backend = Run(cfg.load(None, registry, overrides=overrides, out_dir="/tmp/trainctl-step-bench"), registry, resume="never").backend
    times = {"guarded": [], "plain": []}
    for _ in range(args.rounds):  # alternate, so that machine noise hits both alike
        for name, fn in (("guarded", lambda s: backend.train_step(s)), ("plain", lambda s: plain_step(backend, s))):
            started = time.perf_counter()
            for s in range(args.steps):
                fn(s)
            times[name].append((time.perf_counter() - started) / args.steps * 1000)
    for name, values in times.items():
        print(f"{name:8s} ms/step: median {statistics.median(values):.3f}  min {min(values):.3f}  rounds {[round(v, 3) for v in values]}")
    print(f"overhead (median): {statistics.median(times['guarded']) / statistics.median(times['plain']) - 1:+.1%}")


if __name__ == "__main__":
    main()
