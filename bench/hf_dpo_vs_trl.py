"""The hf backend's DPO (``hf.objective = "dpo"``) against a plain TRL ``DPOTrainer.train()``: same
tiny model, preference pairs, seed, batch, beta, loss type, reference and learning-rate schedule,
run alternately in one process. Reports steps/s of each (from the step-end times, so setup and
the reference's precomputation are left out), their ratio against the goal of 0.97, and the
largest per-step difference of the loss, the reward accuracy, the reward margin and the learning
rate. Built on bench/hf_vs_trl.py (its LR plugin, timing and help check).

    PYTHONPATH=. python bench/hf_dpo_vs_trl.py [--steps 40] [--rounds 3] [--reference copy|precomputed]
        [--loss-type sigmoid|ipo] [--order sequential|random]

Both sides: fused AdamW, clip at 1.0, no weight decay, HF's cosine-with-warmup schedule, pairs
in file order (``data.shuffle = false`` / ``train_sampling_strategy = "sequential"``) or, with
``--order random``, in the Trainer's seeded shuffle (``data.order = "trl"`` / TRL's default
``"random"``), fewer pairs per run than the file holds (one epoch), no held-out split, float32 on
the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import hf_vs_trl  # noqa: E402
from bench.hf_vs_trl import BENCH, help_imports, steps_per_s  # noqa: E402
from tests import hf_assets  # noqa: E402
from trainctl.hooks import PluginSpec, hookimpl  # noqa: E402

LR, WARMUP, BATCH, ACCUM, MAX_LENGTH, SEED, BETA = 5e-4, 4, 4, 2, 256, 1234, 0.1
GOAL = 0.97
COMPARED = ("rewards/accuracies", "rewards/margins")


def preference_rows(n: int) -> list[dict]:
    """A speech asked (cut to 300 characters), the next speech chosen, a later one rejected."""
    speeches = hf_assets.speeches(n + 8)
    rows = []
    for i in range(n):
        asked, chosen, rejected = speeches[i][1][:300], speeches[i + 1][1], speeches[i + 7][1]
        rows.append({"prompt": [{"role": "user", "content": asked}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


class Run:
    """One side's per-step record."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.metrics: dict[str, list[float]] = {name: [] for name in COMPARED}


def run_hf(model_dir: Path, data: Path, out: Path, steps: int, reference: str, loss_type: str, order: str) -> Run:
    from trainctl.kernel import config as cfg
    from trainctl.kernel.registry import Registry
    from trainctl.kernel.run import Run as Session

    registry = Registry.discover(entry_points=False)
    registry.add_module(hf_vs_trl, source="bench")  # the "bench" plugin: HF's schedule, step times and losses
    registry.add_module(sys.modules[__name__], source="bench-dpo")
    overrides = [
        'plugins=["bench", "bench_dpo"]', f"seed={SEED}", f"model.name_or_path='{model_dir}'", f"data.train='{data}'",
        f"model.max_length={MAX_LENGTH}", *hf_vs_trl.order_overrides(order), "data.val_fraction=0.0",
        'hf.objective="dpo"', f"hf.dpo.beta={BETA}", f'hf.dpo.loss_type="{loss_type}"', f'hf.dpo.reference="{reference}"',
        f"train.max_steps={steps}", f"train.batch_size={BATCH}", f"train.grad_accum={ACCUM}", "train.log_interval=1",
        "train.eval_interval=0", "train.device='cpu'", "train.threads=1", "train.grad_clip=1.0",
        f"optim.lr={LR}", "optim.weight_decay=0.0", "optim.beta2=0.99", "optim.eps=1e-8",
    ]
    session = Session(cfg.load(None, registry, overrides=overrides, backend="hf", out_dir=str(out)), registry,
                      resume="never")
    assert session.fit().status == "completed"
    record, plugin = Run(), BENCH["plugin"]
    record.times, record.losses, record.lrs = plugin.times, plugin.losses, plugin.lrs
    record.metrics = DPO_METRICS["plugin"].metrics
    return record


class DPOMetrics:
    """The DPO metrics of every (logged) step event."""

    def __init__(self, config: hf_vs_trl.NoConfig, run: object) -> None:
        self.metrics: dict[str, list[float]] = {name: [] for name in COMPARED}
        DPO_METRICS["plugin"] = self

    @hookimpl
    def trainctl_step_end(self, event) -> None:
        for name in COMPARED:
            self.metrics[name].append(event.metrics[name])


DPO_METRICS: dict[str, DPOMetrics] = {}


@hookimpl
def trainctl_register_plugins(register):
    register(PluginSpec(name="bench_dpo", factory=DPOMetrics, config=hf_vs_trl.NoConfig,
                        description="bench: DPO metrics per step"))


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, reference: str, loss_type: str, order: str) -> Run:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    record = Run()

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            record.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in logs:
                record.losses.append(logs["loss"])
                record.lrs.append(logs["learning_rate"])
                for name in COMPARED:
                    record.metrics[name].append(logs[name])

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    args = DPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, activation_checkpointing=False, seed=SEED,
        max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, max_length=MAX_LENGTH,
        beta=BETA, loss_type=[loss_type], label_smoothing=0.0, precompute_ref_log_probs=reference == "precomputed",
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused",
        train_sampling_strategy=order, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, log_level="error", dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Record()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return record


def max_diff(a: list[float], b: list[float]) -> tuple[float, int]:
    """The largest |a - b| over the steps, and how many steps are bit-identical."""
    pairs = list(zip(a, b, strict=True))
    return max(abs(x - y) for x, y in pairs), sum(x == y for x, y in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", choices=("copy", "precomputed"), default="copy")
    parser.add_argument("--loss-type", choices=("sigmoid", "ipo"), default="sigmoid")
    parser.add_argument("--order", choices=hf_vs_trl.ORDERS, default="sequential")
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
        # more pairs than a run takes: both sides stay in the first epoch
        pairs = opts.steps * BATCH * ACCUM + 8
        data = hf_assets.write_jsonl(root / "pairs.jsonl", preference_rows(pairs))
        speeds: dict[str, list[float]] = {"hf": [], "trl": []}
        walls: dict[str, list[float]] = {"hf": [], "trl": []}
        results: dict[str, Run] = {}
        for r in range(opts.rounds):
            for name in ("hf", "trl") if r % 2 == 0 else ("trl", "hf"):
                fn = run_hf if name == "hf" else run_trl
                record = fn(root / "llama", data, root / f"{name}-{r}", opts.steps, opts.reference, opts.loss_type,
                            opts.order)
                median, wall = steps_per_s(record.times)
                speeds[name].append(median)
                walls[name].append(wall)
                results[name] = record
                print(f"round {r} {name:>3}: {median:.2f} steps/s (median step), {wall:.2f} (wall), "
                      f"last loss {record.losses[-1]:.6f}", flush=True)
        hf, trl = results["hf"], results["trl"]
        hf_speed, trl_speed = statistics.median(speeds["hf"]), statistics.median(speeds["trl"])
        ratio = hf_speed / trl_speed
        hf_wall, trl_wall = statistics.median(walls["hf"]), statistics.median(walls["trl"])
        print(f"\nDPO ({opts.loss_type}, reference {opts.reference}), {opts.steps} steps, batch {BATCH} x {ACCUM} pairs, "
              f"{opts.order} order")
        print(f"steps/s (median over {opts.rounds} rounds of 1/median step time): hf {hf_speed:.2f}, "
              f"trl {trl_speed:.2f}, ratio {ratio:.3f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})")
        print(f"steps/s (wall clock, median over rounds): hf {hf_wall:.2f}, trl {trl_wall:.2f}, ratio {hf_wall / trl_wall:.3f}")
        for label, a, b in [("loss", hf.losses, trl.losses), ("lr", hf.lrs, trl.lrs),
                            *[(name, hf.metrics[name], trl.metrics[name]) for name in COMPARED]]:
            diff, identical = max_diff(a, b)
            print(f"per-step {label}: max |diff| {diff:.2e} over {opts.steps} steps, {identical} bit-identical")
        heavy, help_s = help_imports()
        print(f"trainctl --help: {help_s:.2f}s, heavy modules imported: {heavy or 'none'}")


if __name__ == "__main__":
    main()
