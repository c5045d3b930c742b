"""GRPO learns (issue 19's bar): on a toy verifiable task, the mean reward of a tiny model's
completions rises at least 3x within 200 CPU steps of ``[hf] objective = "grpo"``.

The task: write completions made of one character. The reward is the share of a completion's
characters that are ``--char`` (``e`` by default): a fraction, so the untrained policy already
scores above zero (a random model's tokens are ~6 % ``e``) and every group of completions has a
spread for GRPO's advantages to follow; a 0/1 reward (the built-in ``format``) would start at
zero and give no signal until a completion matched by chance. It is a third party's reward as a
user would write one: a plain function in a module the bench writes into a folder it puts on
``PYTHONPATH``, named ``grpo_learns_reward:share``. It also keeps the completions it scored
last, so the table shows what the policy learned to write.

The model is the tests' tiny random Qwen3 (``tests/hf_assets.py``: 2 layers, 64 wide, the
512-token byte-level BPE tokenizer, 0.14M parameters); the prompts are the first 40 characters
of 64 speeches of the embedded tiny-shakespeare. Each run is the real CLI, ``trainctl run
--backend hf`` in a subprocess, one per seed, at ``train.threads = 1``. Reported per seed: the
mean reward of steps 1-10 (the first completions are the untrained policy's) and of the last 10
steps, their ratio (the bar: >= 3), the first step whose reward is 3x the start, steps/s from
the step-end times (setup left out) and the last completions. The curve is drawn by the real
``trainctl plot --metric reward``.

    .venv/bin/python bench/grpo_learns.py [--steps 200] [--seeds 1,2,3] [--lr 2e-3] [--png grpo_learns.png]
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
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import hf_assets  # noqa: E402

BAR, WINDOW = 3.0, 10  # last-10-steps mean reward >= 3x the first-10-steps mean
# one prompt per micro-batch, 8 completions of it; 16 tokens leave room for ~30-50 characters
GENERATIONS, BATCH, COMPLETION_TOKENS, PROMPTS = 8, 8, 16, 64

REWARD = '''"""The bench's reward: the share of a completion's characters that are TARGET."""

import json

TARGET, LAST = {target!r}, {last!r}


def share(prompts, completions, rows):
    with open(LAST, "w") as f:  # what was scored last, for the bench's table
        json.dump(completions, f)
    return [c.count(TARGET) / max(len(c), 1) for c in completions]
'''


@dataclass(frozen=True, kw_only=True, slots=True)
class Result:
    seed: int
    rewards: list[float]  # per step, from step 1
    lengths: list[float]  # completions/mean_length per step, in tokens
    steps_per_s: float  # 1 / median step-end gap
    wall_s: float  # the subprocess, setup included
    last: list[str]  # the completions scored last

    @property
    def start(self) -> float:
        return statistics.fmean(self.rewards[:WINDOW])

    @property
    def end(self) -> float:
        return statistics.fmean(self.rewards[-WINDOW:])

    @property
    def reached(self) -> int | None:
        """The first step whose reward is BAR x the start mean."""
        return next((i + 1 for i, r in enumerate(self.rewards) if r >= BAR * self.start), None)


def run(seed: int, *, steps: int, lr: float, temperature: float, model: Path, prompts: Path, rewards_dir: Path,
        out: Path) -> Result:
    overrides = [
        'plugins=["jsonl"]', f"seed={seed}", f"model.name_or_path='{model}'", f"data.train='{prompts}'",
        "model.max_length=128", f"train.max_steps={steps}", f"train.batch_size={BATCH}", "train.grad_accum=1",
        "train.device='cpu'", "train.threads=1", "train.log_interval=1", "train.eval_interval=0",
        f"optim.lr={lr}", "optim.weight_decay=0.0",
        "hf.objective='grpo'", "hf.grpo.rewards=['grpo_learns_reward:share']", f"hf.grpo.num_generations={GENERATIONS}",
        f"hf.grpo.max_completion_length={COMPLETION_TOKENS}", f"hf.grpo.temperature={temperature}",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(rewards_dir)]))
    command = [sys.executable, "-m", "trainctl", "run", "--backend", "hf", "--out", str(out), "--resume", "never", "-y"]
    command += [arg for o in overrides for arg in ("--set", o)]
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"trainctl run exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in logged] == list(range(1, steps + 1))
    times = [e["time"] for e in logged]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return Result(seed=seed, rewards=[e["metrics"]["reward"] for e in logged],
                  lengths=[e["metrics"]["completions/mean_length"] for e in logged],
                  steps_per_s=1 / statistics.median(gaps), wall_s=wall,
                  last=json.loads((rewards_dir / "last.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated; one run each")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--char", default="e", help="the target character")
    parser.add_argument("--png", type=Path, default=Path("grpo_learns.png"), help="where trainctl plot writes the curve")
    opts = parser.parse_args()
    assert len(opts.char) == 1, "--char is one character"
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="grpo_learns.") as tmp:
        root = Path(tmp)
        hf_assets.build_tokenizer(root / "tok")
        hf_assets.build_model(root / "qwen3", root / "tok", arch="qwen3")
        prompts = hf_assets.write_jsonl(root / "prompts.jsonl",
                                        [{"prompt": speech[:40]} for _, speech in hf_assets.speeches(PROMPTS)])
        rewards_dir = root / "rewards"
        rewards_dir.mkdir()
        (rewards_dir / "grpo_learns_reward.py").write_text(REWARD.format(target=opts.char, last=str(rewards_dir / "last.json")))
        print(f"task: share of {opts.char!r} among a completion's characters; tiny Qwen3, {PROMPTS} prompts, "
              f"{GENERATIONS} completions of <= {COMPLETION_TOKENS} tokens per step, lr {opts.lr}, "
              f"temperature {opts.temperature}, {opts.steps} steps, 1 thread", flush=True)
        results, dirs = [], []
        for seed in (int(s) for s in opts.seeds.split(",")):
            out = root / f"seed{seed}"
            r = run(seed, steps=opts.steps, lr=opts.lr, temperature=opts.temperature, model=root / "qwen3",
                    prompts=prompts, rewards_dir=rewards_dir, out=out)
            results.append(r)
            dirs.append(out)
            print(f"seed {seed}: reward {r.start:.4f} -> {r.end:.4f} (x{r.end / r.start:.2f}), {r.steps_per_s:.1f} steps/s, "
                  f"{r.wall_s:.1f} s with setup", flush=True)
        plot = subprocess.run([sys.executable, "-m", "trainctl", "plot", *map(str, dirs), "--metric", "reward",
                               "-o", str(opts.png), "--title", f"GRPO: share of {opts.char!r}, tiny Qwen3"],
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
        if plot.returncode != 0:
            raise SystemExit(f"trainctl plot exited {plot.returncode}: {plot.stderr.strip()}")
    print(f"\n| seed | reward, steps 1-{WINDOW} | reward, last {WINDOW} | ratio | 3x reached at step | "
          "mean length (tokens), last 10 | steps/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r.seed} | {r.start:.4f} | {r.end:.4f} | {r.end / r.start:.2f} | {r.reached or '-'} | "
              f"{statistics.fmean(r.lengths[-WINDOW:]):.1f} | {r.steps_per_s:.1f} |")
    for r in results:
        print(f"seed {r.seed}, last completions: {r.last[:3]}")
    curve = [round(statistics.fmean(r.rewards[i:i + 20]), 3) for r in results[:1] for i in range(0, len(r.rewards), 20)]
    print(f"seed {results[0].seed}, mean reward per 20 steps: {curve}")
    passed = all(r.end >= BAR * r.start for r in results)
    print(f"bar (last {WINDOW} >= {BAR:g} x first {WINDOW}, every seed): {'PASS' if passed else 'FAIL'}; wrote {opts.png}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
