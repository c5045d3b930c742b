"""The memory plan's estimate against the measured peak, on this CPU.

Measured: the growth of the process's peak resident memory (``VmHWM`` in /proc/self/status)
from just before the run is assembled (after the imports; the peak is reset through
/proc/self/clear_refs) to the end of a few training steps, in a fresh process per rank so that
the baseline is clean. Resident memory, not torch's allocator statistics: on CPU torch keeps
none, and RSS is what the machine runs out of. No checkpoint is written (plugins = []): the
estimate is of training, and a save's staging is not part of it.

    python bench/memory_plan.py            # baby GPT and GPT-2 small (124M, block 128, batch 4), 1 and 2 ranks
    python bench/memory_plan.py --quick    # the baby GPT only

Each rank of a 2-rank run (torchrun, gloo) is measured alone; the plan's estimate is per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
STEPS = ["train.max_steps=3", "train.eval_interval=0", "train.eval_steps=1", "train.log_interval=1",
         "train.device='cpu'", "train.threads=1", "plugins=[]"]
BABY: list[str] = []  # the defaults: nanoGPT's baby GPT, batch 12 x 64
GPT2_SMALL = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=128",
              "model.vocab_size=50304", "train.batch_size=4"]


def corpus_rows(path: Path, rows: int = 400, chars: int = 2000) -> Path:
    """A JSONL of plain-text rows cut from the embedded corpus, for the hf backend's packed runs."""
    sys.path.insert(0, str(ROOT))
    from trainctl.backends.gpt.data import embedded_text

    text = embedded_text()
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"text": text[i * chars : (i + 1) * chars]}) + "\n")
    return path


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(out: Path, backend: str, overrides: list[str]) -> None:
    """One rank: assemble and train the run, then write its estimate and measured growth."""
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401  (imported before the baseline: not part of the run's memory)

    import trainctl.kernel.loop  # noqa: F401
    from trainctl.kernel import config as cfg
    from trainctl.kernel.registry import Registry, load_factory
    from trainctl.kernel.run import Run

    registry = Registry.discover(entry_points=False)
    load_factory(registry.backend(backend).factory)  # the backend's modules, imported before the baseline
    resolved = cfg.load(None, registry, overrides=overrides, backend=backend, out_dir=str(out / "run"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    session = Run(resolved, registry, resume="never")
    session.fit()
    grown = _status("VmHWM") - base
    memory = session.plan.memory
    rank = int(os.environ.get("RANK", 0))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "measured": grown, "estimate": memory.total,
        "terms": {t.name: t.bytes for t in memory.terms},
    }))
    session.close()  # the ranks leave the process group together: one exiting under a peer's feet aborts it


def measure(overrides: list[str], *, backend: str = "gpt", ranks: int = 1, timeout: float = 600) -> list[dict]:
    """Estimate and measured peak growth of each rank of a short run with ``overrides``."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(Path(__file__).resolve()), "child", tmp, "--backend", backend,
                *[a for o in [*STEPS, *overrides] for a in ("--set", o)]]
        launcher = TORCHRUN if ranks == 2 else [sys.executable] if ranks == 1 else None
        if launcher is None:
            raise ValueError("1 or 2 ranks")
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        proc = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]


def report(name: str, results: list[dict]) -> None:
    for r in results:
        ratio = r["estimate"] / r["measured"]
        terms = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in r["terms"].items() if v)
        print(f"{name:28s} rank {r['rank']}: estimate {r['estimate'] / 2**20:8.1f} MiB, measured "
              f"{r['measured'] / 2**20:8.1f} MiB, ratio {ratio:.2f}  ({terms} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    c = sub.add_parser("child")
    c.add_argument("out", type=Path)
    c.add_argument("--backend", default="gpt")
    c.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parallel", default="", help="train.parallel (ddp | fsdp)")
    args = parser.parse_args()
    if args.command == "child":
        child(args.out, args.backend, args.overrides)
        return
    strategy = [f"train.parallel='{args.parallel}'"] if args.parallel else []
    shapes = [("baby GPT", BABY)] + ([] if args.quick else [("GPT-2 small, block 128 x 4", GPT2_SMALL)])
    for name, overrides in shapes:
        report(f"{name}, 1 process", measure([*overrides, *strategy]))
        report(f"{name}, 2 ranks", measure([*overrides, *strategy, "train.grad_accum=2"], ranks=2))


if __name__ == "__main__":
    main()
