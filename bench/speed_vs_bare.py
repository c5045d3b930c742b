"""Median ms/step of the gpt backend run by the kernel with the default plugins, against a bare
nanoGPT-style loop of the same model, optimizer and batch size written here without the kernel.

Both run in one process, alternating in rounds, so machine noise hits both alike. The kernel
side is timed from its run_start to its last step_end (hooks, lr schedule, logging included);
its final evaluation and checkpoint are outside that window, as they are outside the bare loop.

    .venv/bin/python bench/speed_vs_bare.py [--rounds 9] [--steps 100] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainctl.backends.gpt import data as gpt_data  # noqa: E402
from trainctl.backends.gpt.model import GPT, GPTConfig  # noqa: E402
from trainctl.backends.optim import build_optimizer  # noqa: E402
from trainctl.hooks import PluginSpec, hookimpl  # noqa: E402
from trainctl.kernel import config as cfg  # noqa: E402
from trainctl.kernel.registry import Registry  # noqa: E402
from trainctl.kernel.run import Run  # noqa: E402

BATCH, BLOCK, LR, MIN_LR, WARMUP = 12, 64, 1e-3, 1e-4, 10


class Stopwatch:
    """Bench-only observer: the time from run start to the last step."""

    last: dict[str, float] = {}

    def __init__(self, config, run) -> None:
        self.max_steps = run.max_steps

    @hookimpl(trylast=True)
    def trainctl_run_start(self, event) -> None:
        Stopwatch.last["start"] = time.perf_counter()

    @hookimpl(trylast=True)
    def trainctl_step_end(self, event) -> None:
        if event.step == self.max_steps:
            Stopwatch.last["end"] = time.perf_counter()


@hookimpl
def trainctl_register_plugins(register):
    register(PluginSpec(name="stopwatch", factory=Stopwatch, description="bench timer"))


def kernel_round(registry: Registry, steps: int, out: Path) -> float:
    config = cfg.load(None, registry, out_dir=str(out), overrides=[
        f"train.max_steps={steps}", "train.eval_interval=0", "train.eval_steps=1", "train.device='cpu'",
        "plugin.lr.warmup_steps=10",
    ] + [f"plugins={_default_plugins()}"])
    with contextlib.redirect_stdout(io.StringIO()):
        Run(config, registry, resume="never").fit()
    return (Stopwatch.last["end"] - Stopwatch.last["start"]) / steps


def _default_plugins() -> str:
    return "[" + ", ".join(f'"{p}"' for p in (*cfg.DEFAULT_PLUGINS, "stopwatch")) + "]"


def get_lr(it: int, max_steps: int) -> float:  # nanoGPT's
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (max_steps - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def bare_round(train: np.ndarray, steps: int) -> float:
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False))
    optimizer = build_optimizer(model, name="adamw", lr=LR, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8,
                                device_type="cpu", muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0)
    started = time.perf_counter()
    for it in range(steps):
        lr = get_lr(it, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ix = torch.randint(len(train) - BLOCK, (BATCH,))
        x = torch.stack([torch.from_numpy(train[i:i + BLOCK].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train[i + 1:i + 1 + BLOCK].astype(np.int64)) for i in ix])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % 10 == 0:
            loss.item()  # nanoGPT logs every log_interval steps: one sync there
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides; 0 = torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = Registry.discover(entry_points=False)
    registry.add_module(sys.modules[__name__], source="bench")
    train = gpt_data.load("").train
    kernel, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            kernel.append(kernel_round(registry, args.steps, Path(tmp) / f"k{r}"))
            bare.append(bare_round(train, args.steps))
            print(f"round {r}: kernel {kernel[-1] * 1e3:.2f} ms/step  bare {bare[-1] * 1e3:.2f} ms/step", flush=True)
    k, b = statistics.median(kernel), statistics.median(bare)
    print(f"median ms/step: kernel+default plugins {k * 1e3:.3f}, bare loop {b * 1e3:.3f}, ratio {k / b:.4f}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
