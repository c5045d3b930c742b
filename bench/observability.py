"""Step-time overhead of the observability plugins on the gpt backend (nanoGPT's CPU "baby GPT"
by default); scrape latency is in bench/scrape.py.

    .venv/bin/python bench/observability.py [--rounds 600] [--block 1] [--model baby|tiny]

Step time with ``prometheus + console + jsonl`` (``+ status`` when that plugin is installed)
against no plugins at all: two runs of the same model in one process, on two threads that take
turns step by step, so machine noise hits both alike. A step's time runs from one step event to
the next, every hook included; wall and the training thread's CPU time are reported. Also the
plugins' own cost per step, timed directly on the event bus with synthetic events (exact where
the A/B difference drowns in noise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainctl.hooks import PluginSpec, hookimpl  # noqa: E402
from trainctl.hooks.events import Notice, RunStart, StepEnd  # noqa: E402
from trainctl.kernel import config as cfg  # noqa: E402
from trainctl.kernel.registry import Registry  # noqa: E402
from trainctl.kernel.run import Run  # noqa: E402

MODELS = {
    "baby": [],  # the gpt defaults: nanoGPT's CPU baby GPT, 4x128, block 64, batch 12
    "tiny": ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=8"],
}


class StepClock:
    """Bench-only observer: wall time of every step event; optional callbacks every N steps and
    when the metrics address is known."""

    stamps: list[float] = []
    cpu: list[float] = []  # the training thread's CPU time at each step: immune to other processes
    every: tuple[int, Callable[[int], None]] | None = None
    on_address: Callable[[str], None] | None = None

    def __init__(self, config, run) -> None:
        StepClock.stamps, StepClock.cpu = [], []

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        StepClock.stamps.append(time.perf_counter())
        StepClock.cpu.append(time.thread_time())
        if StepClock.every and event.step % StepClock.every[0] == 0:
            StepClock.every[1](event.step)

    @hookimpl
    def trainctl_notice(self, event: Notice) -> None:
        if event.kind == "metrics" and StepClock.on_address:
            StepClock.on_address(event.data["address"])


BATON: Baton | None = None


@hookimpl
def trainctl_register_plugins(register):
    register(PluginSpec(name="step_clock", factory=StepClock, description="bench timer"))
    register(PluginSpec(name="baton", factory=lambda config, run: BATON.plugin(run.out_dir.name),
                        description="bench: two runs take turns"))


def registry() -> Registry:
    reg = Registry.discover()
    reg.add_module(sys.modules[__name__], source="bench")
    return reg


def observed_plugins(reg: Registry) -> list[str]:
    return ["prometheus", "console", "jsonl"] + (["status"] if "status" in reg.plugins else [])


def session(reg: Registry, out: Path, plugins: list[str], steps: int, *extra: str) -> Run:
    overrides = [f"plugins={json.dumps(plugins)}", f"train.max_steps={steps}",
                 "train.eval_interval=0", "train.eval_steps=1", "plugin.prometheus.port=0", *extra]
    overrides = [o for o in overrides if "prometheus" in plugins or not o.startswith("plugin.prometheus")]
    return Run(cfg.load(None, reg, overrides=overrides, out_dir=str(out)), reg, resume="never")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def bootstrap_ratio(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float]:
    """95% interval of median(a) / median(b) - 1, resampling both."""
    rng = random.Random(0)
    ratios = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b))) - 1
                    for _ in range(n))
    return ratios[int(0.025 * n)], ratios[int(0.975 * n)]


# --- overhead -------------------------------------------------------------------------------


def hook_cost_us(reg: Registry, out: Path, plugins: list[str], events: int = 20000) -> float:
    """Microseconds per step spent in the plugins' step_end + control hooks (1 step in 10 logged)."""
    run = session(reg, out, plugins, 10)
    bus = run.bus
    bus.run_start(RunStart(run_name="bench", backend="gpt", out_dir=str(out), start_step=0, max_steps=events,
                           params=1, tokens_per_step=768, time=time.time()))
    bus.deliver_pending()
    started = time.perf_counter()
    for n in range(1, events + 1):
        logged = n % 10 == 0
        bus.step_end(StepEnd(step=n, max_steps=events, lr=1e-3, tokens=768 * n, step_time=0.03, logged=logged,
                             loss=2.0 if logged else None, grad_norm=0.5 if logged else None,
                             tokens_per_s=25600.0 if logged else None, time=time.time()))
        bus.deliver_pending()
        bus.control(run.state.view(events, "running"))
    elapsed = time.perf_counter() - started
    from trainctl.hooks.events import RunEnd

    bus.run_end(RunEnd(status="completed", step=events, tokens=0, duration=elapsed, time=time.time()))
    run.backend.close()
    return elapsed / events * 1e6


class Baton:
    """Two runs in two threads take turns, ``block`` steps at a time, so that both see the same
    machine load (the CPU is shared); the time a run waits for its turn is not part of a step."""

    def __init__(self, block: int) -> None:
        self.block, self.turn, self.cond = block, "with", threading.Condition()
        self.times: dict[str, list[list[tuple[float, float]]]] = {"with": [], "without": []}  # (wall, cpu)
        self.finished: set[str] = set()

    def plugin(self, name: str) -> object:
        baton = self

        class Turns:
            def __init__(self) -> None:
                self.last = None
                self.block: list[float] = []

            @hookimpl(tryfirst=True)
            def trainctl_run_start(self, event) -> None:
                baton.wait_for(name)
                self.last = (time.perf_counter(), time.thread_time())

            @hookimpl(tryfirst=True)
            def trainctl_step_end(self, event: StepEnd) -> None:
                wall, cpu = time.perf_counter(), time.thread_time()
                self.block.append((wall - self.last[0], cpu - self.last[1]))
                if event.step % baton.block == 0:
                    baton.times[name].append(self.block)
                    self.block = []
                    baton.hand_over(name)
                    baton.wait_for(name)
                self.last = (time.perf_counter(), time.thread_time())

            @hookimpl
            def trainctl_run_end(self, event) -> None:
                baton.finished.add(name)
                baton.hand_over(name)

        return Turns()

    def wait_for(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)

    def hand_over(self, name: str) -> None:
        with self.cond:
            other = "without" if name == "with" else "with"
            self.turn = name if other in self.finished else other
            self.cond.notify_all()


def overhead(args: argparse.Namespace) -> None:
    global BATON
    reg = registry()
    plugins = observed_plugins(reg)
    baton = BATON = Baton(args.block)
    steps = args.block * (args.rounds + 1)  # the first turn of each run warms up
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        runs = {}
        for name, enabled in (("with", plugins), ("without", [])):
            runs[name] = session(reg, Path(tmp) / name, ["baton", *enabled], steps, "train.threads=1", *MODELS[args.model])
        threads = [threading.Thread(target=run.fit) for run in runs.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with_us = hook_cost_us(reg, Path(tmp) / "hooks-with", plugins)
        without_us = hook_cost_us(reg, Path(tmp) / "hooks-without", [])
    print(f"plugins: {' + '.join(plugins)}; {args.rounds * args.block} steps each, alternating every "
          f"{args.block} step(s); gpt {args.model}, 1 torch thread")
    wall_base = 0.0  # the wall-clock step time without plugins, for the hook cost below
    for i, clock in enumerate(("wall", "cpu")):
        # the first turn of each run warms up; every later step counts (a turn's wait is not in it)
        a, b = ([t[i] for block in baton.times[name][1:] for t in block] for name in ("with", "without"))
        base = statistics.median(b)
        if clock == "wall":
            wall_base = base
        low, high = bootstrap_ratio(a, b)
        print(f"{clock:>4} time: no plugins {base * 1e3:.2f} ms/step, with plugins {statistics.median(a) * 1e3:.2f} "
              f"ms/step: {statistics.median(a) / base - 1:+.2%} (95% bootstrap interval {low:+.2%} .. {high:+.2%})")
    print(f"plugin hook cost per step (bus, synthetic events): {with_us - without_us:.1f} us "
          f"= {(with_us - without_us) / 1e6 / wall_base:.3%} of a {wall_base * 1e3:.1f} ms step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=600, help="turns per run")
    parser.add_argument("--block", type=int, default=1, help="steps per turn")
    parser.add_argument("--model", choices=sorted(MODELS), default="baby")
    overhead(parser.parse_args())


if __name__ == "__main__":
    main()
