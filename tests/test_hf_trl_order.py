"""``data.order = "trl"``: a shuffled run in transformers' ``Trainer``'s order, so a shuffled TRL
run (``train_sampling_strategy = "random"``, its default) and its trainctl twin are the same run:
per-step loss, learning rate and gradient norm bit-identical against ``SFTTrainer.train()`` and
``DPOTrainer.train()`` across epoch boundaries (``data.epoch_end = "short_step"``, as ``Trainer``
cuts epochs) and across a resume in a new process. ``data.order = "trainctl"`` (the default) keeps
the permutation its checkpoints were written with, and evaluation's rows never move.

No dropout on either side (the tiny model has none, LoRA is off), so nothing but the order could
tell the runs apart.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import hf_assets
from tests.conftest import ROOT, run_cli
from tests.test_hf_dpo import pair_rows
from trainctl.backends.hf import epochs, sft

SEED, BATCH, ACCUM, LR, MAX_LENGTH, WARMUP = 1234, 4, 2, 3e-3, 128, 2
# 42 rows, 4 per micro-batch, 2 per step: 11 micro-batches (the last of 2 rows), so each epoch is
# 6 steps, its last one micro-batch of 2 rows; 4 epochs make 24 steps and cross 3 epoch ends
ROWS, EPOCHS, STEPS = 42, 4, 24
SAVED = 9  # the resume starts mid-epoch (epoch 2, step 3 of 6) and crosses two epoch ends after it
TRL_ORDER = [f"seed={SEED}", f"data.epochs={EPOCHS}", "data.epoch_end='short_step'", f"train.batch_size={BATCH}",
             f"train.grad_accum={ACCUM}", f"model.max_length={MAX_LENGTH}", "data.packing=false", "data.val_fraction=0.0",
             "data.mask='trl'", f"optim.lr={LR}", "optim.beta2=0.999", "plugin.lr.schedule='cosine'",
             "plugin.lr.family='transformers'", f"plugin.lr.warmup_steps={WARMUP}", "train.eval_interval=0",
             "train.log_interval=1", 'plugins=["lr", "checkpoint", "jsonl"]']


def cli_run(hf, out, data, *sets, extra=()):
    base = [f"model.name_or_path={hf.llama}", f"data.train={data}", f"model.tokenizer={hf.plain_tokenizer}"]
    return run_cli("run", str(ROOT / "configs" / "hf_tiny.toml"), "--yes", "--out", str(out), *extra,
                   *[a for s in (*base, *sets) for a in ("--set", s)])


def steps(out):
    events = map(json.loads, (out / "events.jsonl").read_text().splitlines())
    return {e["step"]: e for e in events if e["event"] == "step"}


def trl_log(trainer_class, config_class, out, **args):
    """A plain ``train()`` in TRL's default shuffled order; the logged steps."""
    import torch
    from transformers import TrainerCallback

    kept = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                kept.append(dict(logs))

    torch.set_num_threads(1)
    trainer_args = config_class(
        output_dir=str(out), use_cpu=True, bf16=False, seed=SEED, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_length=MAX_LENGTH, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=WARMUP, weight_decay=0.0, adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch_fused",
        train_sampling_strategy="random", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, log_level="error", **args.pop("config"),
    )
    trainer = trainer_class(args=trainer_args, callbacks=[Keep()], **args)
    trainer.train()
    return kept


@pytest.fixture(scope="module")
def sft_data(hf):
    return hf_assets.write_jsonl(hf.root / "pc42.jsonl", hf_assets.prompt_completion_rows(ROWS))


@pytest.fixture(scope="module")
def sft_trainer_log(hf, sft_data, tmp_path_factory):
    """``SFTTrainer.train()``: 4 shuffled epochs of prompt/completion rows (completion-only loss)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in sft_data.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(hf.llama, dtype=torch.float32, attn_implementation="sdpa")
    return trl_log(SFTTrainer, SFTConfig, tmp_path_factory.mktemp("trl"), model=model, train_dataset=Dataset.from_list(rows),
                   processing_class=AutoTokenizer.from_pretrained(hf.plain_tokenizer),
                   config={"num_train_epochs": EPOCHS, "max_steps": -1})


def assert_same_steps(ours: dict[int, dict], theirs: list[dict], first: int = 1) -> None:
    assert sorted(ours) == list(range(first, len(theirs) + 1))
    theirs = theirs[first - 1 :]
    assert [ours[s]["loss"] for s in sorted(ours)] == [t["loss"] for t in theirs]  # bit-identical, step by step
    assert [ours[s]["lr"] for s in sorted(ours)] == pytest.approx([t["learning_rate"] for t in theirs], rel=1e-9, abs=1e-15)
    assert [ours[s]["grad_norm"] for s in sorted(ours)] == [t["grad_norm"] for t in theirs]


def test_shuffled_sft_equals_sft_trainer_across_epochs_and_a_resume(hf, sft_data, sft_trainer_log, tmp_path):
    full = tmp_path / "full"
    proc = cli_run(hf, full, sft_data, *TRL_ORDER, "data.order='trl'", f"train.save_interval={SAVED}")
    assert proc.returncode == 0, proc.stderr
    assert len(sft_trainer_log) == STEPS
    assert_same_steps(steps(full), sft_trainer_log)
    assert (f"run length: {STEPS} steps (data.epochs = {EPOCHS}) x 8 rows = {EPOCHS}.00 epochs of {ROWS} rows; each epoch "
            "ends with a shorter step, as TRL's; shuffled as TRL's Trainer shuffles (data.order = \"trl\": accelerate's "
            f"seeded sampler, seed {SEED} + epoch)") in proc.stdout

    # a new process from the mid-epoch checkpoint: the rest of the run is TRL's uninterrupted one
    resumed = tmp_path / "resumed"
    proc = cli_run(hf, resumed, sft_data, *TRL_ORDER, "data.order='trl'",
                   extra=("--resume", str(full / "checkpoints" / f"step-{SAVED:06d}")))
    assert proc.returncode == 0, proc.stderr
    assert_same_steps(steps(resumed), sft_trainer_log, first=SAVED + 1)


def test_trainctl_order_is_unchanged_and_not_trls(hf, sft_data, sft_trainer_log, tmp_path):
    # the permutation trainctl's checkpoints resume on: NumPy's default_rng((seed, epoch, split))
    assert sft.trainctl_order(10, SEED, 0, "train").tolist() == [8, 9, 5, 0, 2, 6, 4, 7, 1, 3]
    assert sft.trainctl_order(10, SEED, 1, "train").tolist() == np.random.default_rng((SEED, 1, 0)).permutation(10).tolist()
    out = tmp_path / "default"
    proc = cli_run(hf, out, sft_data, *[s for s in TRL_ORDER if not s.startswith("data.epochs")], "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr
    assert 'shuffled by trainctl\'s seeded order (data.order = "trainctl"; "trl" is TRL\'s Trainer\'s)' in proc.stdout
    assert steps(out)[1]["loss"] != sft_trainer_log[0]["loss"]  # other rows: what data.order = "trl" is for


class Rows:
    """The order methods that ``SFTData`` and ``PreferenceData`` share, over plain row counts."""

    order = sft.SFTData.order
    indices = sft.SFTData.indices

    def __init__(self, order: str, n: int = 42, n_val: int = 7, order_seed: int = -1) -> None:
        self.train, self.val, self.seed, self._orders = range(n), range(n_val), SEED, {}
        self.shuffler, self.order_seed = sft.shuffler(order, order_seed, SEED)


def test_trl_order_is_trainers_sampler_per_epoch_and_leaves_validation_alone():
    from accelerate.data_loader import SeedableRandomSampler

    trl, ours = Rows("trl"), Rows("trainctl")
    for epoch in range(3):  # Trainer: one sampler, set_epoch(epoch) before each pass
        sampler = SeedableRandomSampler(range(42), data_seed=SEED)
        sampler.set_epoch(epoch)
        assert trl.order("train", epoch, True).tolist() == list(sampler)
        assert ours.order("train", epoch, True).tolist() == sft.trainctl_order(42, SEED, epoch, "train").tolist()
    assert Rows("trl", order_seed=7).order("train", 1, True).tolist() == sft.trainer_order(42, 8, 0).tolist()  # seed + epoch
    # continue-mode streams run epoch after epoch in the same orders
    first, second = trl.order("train", 0, True).tolist(), trl.order("train", 1, True).tolist()
    assert trl.indices("train", 40, 4, True) == first[40:] + second[:2]
    # a short-step layout cuts each epoch of that order
    layout = epochs.Layout(n_rows=42, batch_size=4, grad_accum=2, short_step=True, shuffle=True)
    assert layout.step(trl, 5) == [first[40:42]] and layout.step(trl, 6) == [second[0:4], second[4:8]]
    # unshuffled both are the file's order, and evaluation reads the validation rows in it
    assert trl.order("train", 3, False).tolist() == ours.order("train", 3, False).tolist() == list(range(42))
    assert trl.order("val", 2**32 - 1, False).tolist() == list(range(7))


def test_shuffled_dpo_equals_dpo_trainer_across_epochs(hf, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    # 46 pairs: 12 micro-batches of 4 (the last of 2), 6 steps an epoch; 2 epochs, Trainer's seed 5
    rows = pair_rows(46)
    data = hf_assets.write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "ours"
    sets = [s for s in TRL_ORDER if not s.startswith(("data.epochs", "data.mask", "model.tokenizer"))]
    proc = run_cli("run", str(ROOT / "configs" / "hf_tiny.toml"), "--yes", "--out", str(out), *[
        a for s in (f"model.name_or_path={hf.llama}", f"data.train={data}", *sets, "data.epochs=2", "data.order='trl'",
                    "data.order_seed=5", "hf.objective='dpo'", "hf.dpo.beta=0.1") for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(hf.llama, dtype=torch.float32, attn_implementation="sdpa")
    theirs = trl_log(DPOTrainer, DPOConfig, tmp_path / "trl", model=model, train_dataset=Dataset.from_list(rows),
                     processing_class=AutoTokenizer.from_pretrained(hf.llama),
                     config={"num_train_epochs": 2, "max_steps": -1, "data_seed": 5, "beta": 0.1, "loss_type": ["sigmoid"],
                             "activation_checkpointing": False})
    assert len(theirs) == 12
    assert_same_steps(steps(out), theirs)
