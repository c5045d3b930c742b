"""The hf backend against a plain TRL ``SFTTrainer.train()``: same tiny model, rows, seed, batch
and learning-rate schedule, run alternately in one process. Reports steps/s of each (from the
step-end times, so setup is left out), their ratio, the largest per-step loss and
learning-rate difference, and checks that ``trainctl --help`` imports no torch.

    PYTHONPATH=. python bench/hf_vs_trl.py [--steps 40] [--rounds 3] [--order sequential|random]

The kernel gets HF's cosine-with-warmup schedule from a small LR plugin defined here, so both
sides apply the same learning rate at every step; both use fused AdamW, clip at 1.0, no weight
decay, TRL's BFD packing with assistant-only loss, and one row order: ``sequential`` (file order,
``data.shuffle = false``) or ``random`` (TRL's default ``train_sampling_strategy``: the Trainer's
seeded shuffle, which trainctl reproduces with ``data.order = "trl"``).
"""

from __future__ import annotations

import argparse
import math
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
from trainctl.hooks import PluginSpec, RunInfo, hookimpl  # noqa: E402

LR, WARMUP, BATCH, ACCUM, MAX_LENGTH, SEED = 3e-3, 4, 4, 2, 256, 1234


def hf_cosine(step: int, total: int) -> float:
    """transformers' get_cosine_schedule_with_warmup, as a multiplier of the peak LR."""
    if step < WARMUP:
        return step / max(1, WARMUP)
    progress = (step - WARMUP) / max(1, total - WARMUP)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True, kw_only=True, slots=True)
class NoConfig:
    pass


class BenchPlugin:
    """HF's schedule as the kernel's LR, and the time and loss of every step."""

    def __init__(self, config: NoConfig, run: RunInfo) -> None:
        self.total = run.max_steps
        self.times: list[float] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []
        BENCH["plugin"] = self

    @hookimpl
    def trainctl_lr(self, step: int, base_lr: float) -> float:
        return base_lr * hf_cosine(step, self.total)

    @hookimpl
    def trainctl_step_end(self, event) -> None:
        self.times.append(time.perf_counter())
        self.losses.append(event.loss)
        self.lrs.append(event.lr)


BENCH: dict[str, BenchPlugin] = {}
ORDERS = ("sequential", "random")  # TRL's train_sampling_strategy values the benches compare


def order_overrides(order: str) -> list[str]:
    """trainctl's settings for TRL's ``train_sampling_strategy = order``."""
    return ["data.shuffle=false"] if order == "sequential" else ["data.shuffle=true", "data.order='trl'"]


@hookimpl
def trainctl_register_plugins(register):
    register(PluginSpec(name="bench", factory=BenchPlugin, config=NoConfig, description="bench LR and timer"))


def run_hf(model_dir: Path, data: Path, out: Path, steps: int, order: str) -> tuple[list[float], list[float], list[float]]:
    from trainctl.kernel import config as cfg
    from trainctl.kernel.registry import Registry
    from trainctl.kernel.run import Run

    registry = Registry.discover(entry_points=False)
    registry.add_module(sys.modules[__name__], source="bench")
    overrides = [
        'plugins=["bench"]', f"seed={SEED}", f"model.name_or_path='{model_dir}'", f"data.train='{data}'",
        f"model.max_length={MAX_LENGTH}", "data.packing='bfd'", *order_overrides(order), "data.val_fraction=0.0",
        f"train.max_steps={steps}", f"train.batch_size={BATCH}", f"train.grad_accum={ACCUM}", "train.log_interval=1",
        "train.eval_interval=0", "train.device='cpu'", "train.threads=1", "train.grad_clip=1.0",
        f"optim.lr={LR}", "optim.weight_decay=0.0", "optim.beta2=0.99", "optim.eps=1e-8",
    ]
    session = Run(cfg.load(None, registry, overrides=overrides, backend="hf", out_dir=str(out)), registry, resume="never")
    assert session.fit().status == "completed"
    plugin = BENCH["plugin"]
    return plugin.times, plugin.losses, plugin.lrs


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, order: str) -> tuple[list[float], list[float], list[float]]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    class Record(TrainerCallback):
        def __init__(self) -> None:
            self.times, self.losses, self.lrs = [], [], []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in logs:
                self.losses.append(logs["loss"])
                self.lrs.append(logs["learning_rate"])

    torch.set_num_threads(1)
    import json

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    args = SFTConfig(
        output_dir=str(out), use_cpu=True, bf16=False, activation_checkpointing=False, seed=SEED,
        max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        max_length=MAX_LENGTH, packing=True, packing_strategy="bfd", assistant_only_loss=True,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused",
        train_sampling_strategy=order, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, log_level="error", dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    record = Record()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[record])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return record.times, record.losses, record.lrs


def steps_per_s(times: list[float]) -> tuple[float, float]:
    """(1 / median step time, steps / wall time) from step-end timestamps. The median is what the
    ratio uses: on a shared machine, other processes add long random stalls to single steps."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    return 1 / statistics.median(gaps), len(gaps) / sum(gaps)


def help_imports() -> tuple[list[str], float]:
    code = ("import sys, time; t = time.perf_counter()\nfrom trainctl.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'trl') if m in sys.modules], time.perf_counter() - t)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("HEAVY"))
    heavy = line.split("[", 1)[1].split("]", 1)[0]
    return [m.strip(" '") for m in heavy.split(",") if m.strip()], float(line.rsplit(" ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--order", choices=ORDERS, default="sequential")
    opts = parser.parse_args()
    import datasets
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf_assets.build_tokenizer(root / "tok")
        hf_assets.build_model(root / "llama", root / "tok")
        # 2048 chats pack into ~100 steps: the run stays in one epoch, where both order rows alike (at an
        # epoch's end TRL runs a short last step; the kernel's row stream goes on into the next epoch)
        data = hf_assets.write_jsonl(root / "messages.jsonl", hf_assets.message_rows(2048))
        speeds: dict[str, list[float]] = {"hf": [], "trl": []}
        walls: dict[str, list[float]] = {"hf": [], "trl": []}
        results: dict[str, tuple[list[float], list[float]]] = {}
        for r in range(opts.rounds):
            order = ("hf", "trl") if r % 2 == 0 else ("trl", "hf")
            for name in order:
                fn = run_hf if name == "hf" else run_trl
                times, losses, lrs = fn(root / "llama", data, root / f"{name}-{r}", opts.steps, opts.order)
                median, wall = steps_per_s(times)
                speeds[name].append(median)
                walls[name].append(wall)
                results[name] = (losses, lrs)
                print(f"round {r} {name:>3}: {median:.2f} steps/s (median step), {wall:.2f} (wall), "
                      f"last loss {losses[-1]:.6f}", flush=True)
        (hf_losses, hf_lrs), (trl_losses, trl_lrs) = results["hf"], results["trl"]
        loss_diff = max(abs(a - b) for a, b in zip(hf_losses, trl_losses, strict=True))
        lr_diff = max(abs(a - b) for a, b in zip(hf_lrs, trl_lrs, strict=True))
        identical = sum(a == b for a, b in zip(hf_losses, trl_losses))
        hf_speed, trl_speed = statistics.median(speeds["hf"]), statistics.median(speeds["trl"])
        heavy, help_s = help_imports()
        hf_wall, trl_wall = statistics.median(walls["hf"]), statistics.median(walls["trl"])
        print(f"\n{opts.order} row order, {opts.steps} steps")
        print(f"steps/s (median over {opts.rounds} rounds of 1/median step time): hf {hf_speed:.2f}, "
              f"trl {trl_speed:.2f}, ratio {hf_speed / trl_speed:.3f}")
        print(f"steps/s (wall clock, median over rounds): hf {hf_wall:.2f}, trl {trl_wall:.2f}, ratio {hf_wall / trl_wall:.3f}")
        print(f"per-step loss: max |diff| {loss_diff:.2e} over {opts.steps} steps, {identical} bit-identical; "
              f"lr max |diff| {lr_diff:.2e}")
        print(f"trainctl --help: {help_s:.2f}s, heavy modules imported: {heavy or 'none'}")


if __name__ == "__main__":
    main()
