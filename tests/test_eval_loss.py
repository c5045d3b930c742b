"""The eval loss a TRL user reads: ``train.eval_loss = "batches"`` is ``Trainer.evaluate()``'s
``eval_loss`` (and TRL's ``eval_mean_token_accuracy``) on the same weights and rows, through the
real CLI, padded and padding-free; ``"tokens"`` is the token mean, a different number on data
whose batches score different token counts; every eval event, the plan and ``/metrics`` say which.
The SFT step metrics come under TRL's names with TRL's values."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests import hf_assets
from tests.conftest import ROOT, run_cli

EVAL_BATCH, SEED = 8, 1234


@pytest.fixture(scope="module")
def split_files(hf, tmp_path_factory):
    """21 training rows and 19 validation rows (not a multiple of the eval batch), of uneven lengths."""
    root = tmp_path_factory.mktemp("eval_loss")
    rows = hf_assets.prompt_completion_rows(40)
    return hf_assets.write_jsonl(root / "train.jsonl", rows[:21]), hf_assets.write_jsonl(root / "val.jsonl", rows[21:])


def step0_eval(hf, out, split_files, *sets):
    """``trainctl run`` that evaluates the untrained model (train.eval_at_start), then one step:
    the run's stdout and its step-0 val eval event."""
    train, val = split_files
    base = [f"model.name_or_path={hf.llama}", f"model.tokenizer={hf.plain_tokenizer}", f"data.train={train}",
            f"data.val={val}", "train.max_steps=1", "train.eval_at_start=true", "train.eval_interval=0",
            "train.eval_steps=0", f"train.eval_batch_size={EVAL_BATCH}", "train.threads=1"]
    proc = run_cli("run", str(ROOT / "configs" / "hf_tiny.toml"), "--yes", "--out", str(out),
                   *[a for s in (*base, *sets) for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    [event] = [e for e in records if e["event"] == "eval" and e["step"] == 0 and e["split"] == "val"]
    return proc.stdout, event


def trl_evaluate(hf, split_files, packing: bool) -> tuple[dict, float]:
    """``SFTTrainer.evaluate()`` of the tiny model on the validation rows, and the token mean of
    the same batches (every scored token's CE, over the whole split)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    train, val = ([json.loads(line) for line in f.read_text().splitlines()] for f in split_files)
    args = SFTConfig(output_dir=str(hf.root / "trl_eval"), use_cpu=True, bf16=False, seed=SEED, max_length=128,
                     per_device_eval_batch_size=EVAL_BATCH, packing=packing, report_to=[], disable_tqdm=True,
                     log_level="error")
    model = AutoModelForCausalLM.from_pretrained(hf.llama, dtype=torch.float32, attn_implementation="sdpa")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                         eval_dataset=Dataset.from_list(val), processing_class=AutoTokenizer.from_pretrained(hf.plain_tokenizer))
    metrics = trainer.evaluate()
    loss_sum, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            out = model(**batch, use_cache=False, fused_lm_head=True)
            loss_sum, tokens = loss_sum - float(out.log_probs.double().sum()), tokens + int(out.label_mask.sum())
    return metrics, loss_sum / tokens


@pytest.mark.parametrize("packing", ["false", "bfd"])
def test_batches_is_trainer_evaluate_eval_loss_over_the_whole_split(hf, tmp_path, split_files, packing):
    """19 rows (padded) or 10 packed rows in padding-free batches: batches of 8 and a short last one."""
    stdout, event = step0_eval(hf, tmp_path / "ours", split_files, f"data.packing={packing}", "train.eval_loss=batches")
    theirs, _ = trl_evaluate(hf, split_files, packing=packing != "false")
    assert event["loss"] == pytest.approx(theirs["eval_loss"], rel=1e-6, abs=0)
    assert event["metrics"]["accuracy"] == pytest.approx(theirs["eval_mean_token_accuracy"], rel=1e-6)
    assert event["loss_mean"] == "batches"
    assert "eval loss: batches: each eval batch's token mean, weighted by its rows, as Trainer.evaluate()'s eval_loss" in stdout


def test_tokens_is_the_token_mean_and_another_number(hf, tmp_path, split_files):
    stdout, event = step0_eval(hf, tmp_path / "ours", split_files, "data.packing=false")  # train.eval_loss's default
    theirs, token_mean = trl_evaluate(hf, split_files, packing=False)
    assert event["loss_mean"] == "tokens"
    assert event["loss"] == pytest.approx(token_mean, rel=1e-6, abs=0)
    assert abs(event["loss"] - theirs["eval_loss"]) > 1e-4  # batches of 2 to 8 rows score unequal token counts
    assert "eval loss: tokens: the mean over every scored token" in stdout


def test_the_prometheus_eval_loss_names_its_mean(tmp_path):
    from prometheus_client import generate_latest

    from tests.test_prometheus import parse, value
    from trainctl.hooks import RunInfo
    from trainctl.hooks.events import EvalEnd
    from trainctl.plugins.prometheus import Config, PrometheusExporter

    exporter = PrometheusExporter(Config(port=0), RunInfo(run_name="t", backend="hf", out_dir=tmp_path, max_steps=2))
    exporter.trainctl_eval_end(EvalEnd(step=2, split="val", loss=1.25, loss_mean="batches", time=0.0))
    exporter.trainctl_eval_end(EvalEnd(step=2, split="val", loss=1.5, source="remote", time=0.0))
    samples = parse(generate_latest(exporter.registry).decode())
    assert value(samples, "trainctl_eval_loss", split="val", source="local", mean="batches") == 1.25
    assert value(samples, "trainctl_eval_loss", split="val", source="remote", mean="tokens") == 1.5


def scores(*batches):
    """BatchScores of (loss sum, correct, tokens, rows) on the CPU."""
    import torch

    from trainctl.backends import scoring

    return [scoring.BatchScore(torch.tensor(float(s)), torch.tensor(float(c)), n, r) for s, c, n, r in batches]


def test_batches_weigh_each_batch_mean_by_its_rows():
    import torch

    from trainctl.backends import scoring

    batches = scores((20.0, 5, 10, 8), (3.0, 0, 2, 3), (0.0, 0, 0, 1))  # the last scores nothing: 0, as TRL clamps it
    run = lambda mean, b: scoring.evaluate(torch.nn.Linear(1, 1), {"val": b}, lambda s: s, torch.autocast("cpu", enabled=False),  # noqa: E731
                                           torch.device("cpu"), mean=mean)["val"]
    batched, tokens = run("batches", batches), run("tokens", batches)
    assert batched.loss == pytest.approx((8 * 2.0 + 3 * 1.5 + 0) / 12) and batched.accuracy == pytest.approx(0.5 / 3)
    assert tokens.loss == pytest.approx(23.0 / 12) and tokens.accuracy == pytest.approx(5 / 12)
    assert (batched.loss_mean, tokens.loss_mean, batched.tokens) == ("batches", "tokens", 12)
    # the gpt backend's batches all score B * T tokens: both means are the same number
    even = scores((16.0, 4, 8, 2), (8.0, 2, 8, 2))
    assert run("batches", even).loss == pytest.approx(run("tokens", even).loss)


def test_num_tokens_of_a_resumed_run_counts_the_steps_before_it():
    import numpy as np
    from datasets import Dataset

    from trainctl.backends.hf.num_tokens import InputTokens

    train = Dataset.from_dict({"input_ids": [[1] * n for n in (3, 5, 7, 11, 13, 17)]})
    backend = SimpleNamespace(sft=None, layout=SimpleNamespace(step=lambda sft, s: [[s % 6], [(s + 1) % 6]]))
    steady = InputTokens(train)
    assert [steady.through(backend, s) for s in range(4)] == list(np.cumsum([8, 12, 18, 24]))
    assert InputTokens(train).through(backend, 3) == 62  # a process resumed at step 3


def test_sft_step_metrics_are_trls(hf, tmp_path, split_files):
    """``entropy``, ``mean_token_accuracy`` and ``num_tokens`` of each step, as SFTTrainer logs
    them (the mean of the micro-batches' token means; input tokens so far), in sequential order."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    train, _ = split_files
    out = tmp_path / "ours"
    sets = [f"model.name_or_path={hf.llama}", f"model.tokenizer={hf.plain_tokenizer}", f"data.train={train}",
            "data.packing=false", "data.shuffle=false", "data.val_fraction=0.0", "train.max_steps=3",
            "train.batch_size=3", "train.grad_accum=2", "train.log_interval=1", "train.eval_interval=0",
            "train.threads=1", f"seed={SEED}", "optim.lr=3e-3", "plugin.lr.family='transformers'",
            "plugin.lr.schedule='constant'", "plugin.lr.warmup_steps=0"]
    proc = run_cli("run", str(ROOT / "configs" / "hf_tiny.toml"), "--yes", "--out", str(out), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr
    ours = [e["metrics"] for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == "step"]

    theirs: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in logs:
                theirs.append(dict(logs))

    torch.set_num_threads(1)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, seed=SEED, max_steps=3,
                     per_device_train_batch_size=3, gradient_accumulation_steps=2, max_length=128, learning_rate=3e-3,
                     lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch_fused", train_sampling_strategy="sequential",
                     logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, log_level="error")
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    SFTTrainer(model=AutoModelForCausalLM.from_pretrained(hf.llama, dtype=torch.float32, attn_implementation="sdpa"),
               args=args, train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(hf.plain_tokenizer),
               callbacks=[Record()]).train()
    assert len(ours) == len(theirs) == 3
    assert [m["num_tokens"] for m in ours] == [t["num_tokens"] for t in theirs]  # a count: exact
    for name in ("entropy", "mean_token_accuracy"):
        assert [m[name] for m in ours] == pytest.approx([t[name] for t in theirs], rel=1e-6, abs=1e-9), name
