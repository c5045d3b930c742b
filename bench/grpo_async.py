"""Asynchronous GRPO generation pays (issue 19's bar): with generation time about the step's
training time, ``hf.grpo.max_staleness = 1`` gives >= 1.6x the synchronous steps/s with the
trainer idle <= 10 % of the wall time.

The model is the tests' tiny random Qwen3 (``tests/hf_assets.py``, 0.14M parameters), prompts the
first ``--prompt-chars`` (200) characters of 32 speeches, 8 completions of up to ``--tokens`` (16)
tokens per prompt, one prompt per micro-batch and ``grad_accum = 2``: the defaults make a
synchronous step's generation and training about equal on this CPU (the premise of the bar).
Each setting is the real CLI, ``trainctl run --backend hf`` in a subprocess at ``train.threads =
1`` (the generator thread shares the process). Reported per k: steps/s from the step-end times
(the first ``SKIP`` steps left out: the pipeline fills), the mean generation seconds and the rest
of the step (the training part, synchronous run), the trainer and generator idle fractions of the
last rollout event, and the staleness counts. ``uptime``'s load is printed with them: the machine
is shared. The k = 1 generation seconds against k = 0's are what running beside the trainer
costs the generator (two busy cores instead of one).

``--worker`` measures k = 1 with one ``trainctl rollout-worker`` process instead of the thread
(``hf.grpo.rollout_workers``; the worker at ``train.threads = 1`` too), against the same k = 0;
``--workers N`` with N of them (batch n on worker n mod N).

    .venv/bin/python bench/grpo_async.py [--steps 30] [--tokens 16] [--prompt-chars 200] [--worker [--workers N]]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import hf_assets  # noqa: E402

BAR_SPEEDUP, BAR_IDLE, SKIP = 1.6, 0.10, 3


def run(root: Path, model: Path, data: Path, k: int, steps: int, tokens: int, workers: int = 0) -> dict:
    out = root / f"k{k}-workers{workers}"
    sets = [
        'plugins=["jsonl"]', "seed=1", f"model.name_or_path='{model}'", f"data.train='{data}'", "model.max_length=64",
        f"train.max_steps={steps}", "train.batch_size=8", "train.grad_accum=2", "train.device='cpu'", "train.threads=1",
        "train.log_interval=1", "train.eval_interval=0", "optim.lr=1e-3", "hf.objective='grpo'",
        "hf.grpo.rewards=['tests.grpo_rewards:e_share']", "hf.grpo.num_generations=8",
        f"hf.grpo.max_completion_length={tokens}", f"hf.grpo.max_staleness={k}",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    generators, ports = [], []
    for _ in range(workers):  # processes of their own, ready before the trainer starts: the idle fractions leave their start-up out
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        generators.append(subprocess.Popen([sys.executable, "-m", "trainctl", "rollout-worker", "--backend", "hf",
                                            "--port", str(ports[-1]), "--weights", str(out / "rollout-weights"),
                                            *[a for s in sets for a in ("--set", s)]],
                                           env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    for generator in generators:
        if "listening on" not in generator.stdout.readline():  # printed once its model is loaded
            raise SystemExit(f"a rollout worker did not start (exit {generator.wait()})")
    if workers:
        sets.append(f"hf.grpo.rollout_workers={['127.0.0.1:%d' % port for port in ports]}")
    try:
        proc = subprocess.run([sys.executable, "-m", "trainctl", "run", "--yes", "--backend", "hf", "--out", str(out),
                               "--resume", "never", *[a for s in sets for a in ("--set", s)]],
                              env=env, capture_output=True, text=True, timeout=1800)
    finally:
        for generator in generators:
            generator.terminate()
            generator.wait()
    name = f"{k}, {workers} worker{'s' if workers > 1 else ''}" if workers else k
    if proc.returncode:
        raise SystemExit(f"k={name} failed: {proc.stderr[-2000:]}")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    step_times = [e["step_time"] for e in events if e["event"] == "step"][SKIP:]
    rollouts = [e for e in events if e["event"] == "rollout"]
    generation = statistics.mean(r["generation_s"] for r in rollouts[SKIP:])
    return {"k": name, "steps_per_s": len(step_times) / sum(step_times), "step_s": statistics.mean(step_times),
            "generation_s": generation, "trainer_idle": rollouts[-1].get("trainer_idle_fraction"),
            "generator_idle": rollouts[-1].get("generator_idle_fraction"),
            "staleness": dict(sorted(Counter(r["staleness"] for r in rollouts).items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompt-chars", type=int, default=200, help="each prompt: a speech's first N characters")
    parser.add_argument("--worker", action="store_true", help="k = 1 with a rollout-worker process, not the thread")
    parser.add_argument("--workers", type=int, default=1, help="with --worker: how many rollout-worker processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="grpo-async-") as tmp:
        root = Path(tmp)
        hf_assets.build_tokenizer(root / "tok")
        hf_assets.build_model(root / "qwen3", root / "tok", arch="qwen3")
        rows = [{"prompt": speech[:args.prompt_chars]} for _, speech in hf_assets.speeches(32)]
        data = hf_assets.write_jsonl(root / "prompts.jsonl", rows)
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        results = [run(root, root / "qwen3", data, 0, args.steps, args.tokens),
                   run(root, root / "qwen3", data, 1, args.steps, args.tokens, workers=args.workers if args.worker else 0)]
        load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    sync, asyn = results
    print(f"load before: {load}\nload after:  {load_after}")
    print("| k | steps/s | step s | generation s | trainer idle | generator idle | staleness counts |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        idle = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        print(f"| {r['k']} | {r['steps_per_s']:.3f} | {r['step_s']:.3f} | {r['generation_s']:.3f} | "
              f"{idle(r['trainer_idle'])} | {idle(r['generator_idle'])} | {r['staleness']} |")
    train_s = sync["step_s"] - sync["generation_s"]
    speedup = asyn["steps_per_s"] / sync["steps_per_s"]
    met = speedup >= BAR_SPEEDUP and (asyn["trainer_idle"] or 0) <= BAR_IDLE
    print(f"synchronous step: generation {sync['generation_s']:.3f} s + training {train_s:.3f} s; "
          f"k={asyn['k']} / k=0 steps/s = {speedup:.2f}x (bar {BAR_SPEEDUP}x, trainer idle <= {BAR_IDLE:.0%}): "
          f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
