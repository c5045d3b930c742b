"""A TRL run moved to trainctl is the same run. Each test writes a ``trl sft`` / ``trl dpo`` YAML of
the shapes in TRL's ``examples/cli_configs``, runs TRL's own script on it (``tests/trl_reference.py``:
TRL's parser, its dataset loading, its Trainer), converts the same file with ``trainctl config
import-trl`` and runs that: per-step loss bit-identical, learning rate and gradient norm equal,
and the eval loss TRL reports, in TRL's default shuffled order, across epoch boundaries, and
across a trainctl stop and resume. No dropout anywhere, so TRL itself is deterministic."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import hf_assets
from tests.conftest import ROOT, cli_env, run_cli
from tests.test_hf_dpo import pair_rows
from trainctl.kernel.run import Run


def trl_log(script: str, settings: dict, tmp_path) -> list[dict]:
    """``trl <script> --config`` on ``settings``: the Trainer's log history."""
    import yaml

    source, out = tmp_path / f"trl_{script}.yaml", tmp_path / f"trl_{script}.json"
    source.write_text(yaml.safe_dump(settings | {"output_dir": str(tmp_path / "trl_out")}))
    proc = subprocess.run([sys.executable, "-m", "tests.trl_reference", script, str(source), str(out)], cwd=ROOT,
                          env=cli_env() | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def imported(settings: dict, tmp_path, *flags: str) -> tuple[str, str]:
    """``config import-trl`` of ``settings``: the TOML's path and the notes on stderr."""
    import yaml

    source, target = tmp_path / "moved.yaml", tmp_path / "moved.toml"
    source.write_text(yaml.safe_dump(settings | {"output_dir": str(tmp_path / "ours")}))
    proc = run_cli("config", "import-trl", str(source), "-o", str(target), *flags)
    assert proc.returncode == 0, proc.stderr
    return str(target), proc.stderr


def our_log(out) -> tuple[list[dict], list[dict]]:
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps = {e["step"]: e for e in events if e["event"] == "step"}  # a resumed run logs its steps once
    evals = [e for e in events if e["event"] == "eval" and e["split"] == "val"]
    return [steps[s] for s in sorted(steps)], evals


def assert_same_run(ours: list[dict], theirs: list[dict], evals: list[dict] | None = None) -> None:
    trained = [h for h in theirs if "loss" in h]
    assert len(ours) == len(trained) >= 10
    assert [e["loss"] for e in ours] == [h["loss"] for h in trained]  # bit for bit
    assert [e["lr"] for e in ours] == pytest.approx([h["learning_rate"] for h in trained], rel=1e-9, abs=1e-15)
    assert [e["grad_norm"] for e in ours] == pytest.approx([h["grad_norm"] for h in trained], rel=1e-6)
    if evals is not None:
        reported = {h["step"]: h["eval_loss"] for h in theirs if "eval_loss" in h}
        assert reported, "TRL evaluated nothing"
        mine = {e["step"]: e["loss"] for e in evals}
        assert {s: mine[s] for s in reported} == pytest.approx(reported, rel=1e-6)


COMMON = {"seed": 7, "use_cpu": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
          "disable_tqdm": True, "max_length": 128, "dataloader_num_workers": 0}


def test_messages_lora_packing_cosine_with_min_lr_as_trl_sft(hf, tmp_path):
    """TRL's ``examples/cli_configs``-style SFT file: conversations (TRL trains every token),
    LoRA, BFD packing, cosine_with_min_lr with warmup, the default random order over 2 epochs,
    and evaluation on the test split of a folder of jsonl files (load_dataset's splits)."""
    data = tmp_path / "chats"
    data.mkdir()
    rows = hf_assets.message_rows(40)
    hf_assets.write_jsonl(data / "train.jsonl", rows[:30])
    hf_assets.write_jsonl(data / "test.jsonl", rows[30:])
    settings = COMMON | {
        "model_name_or_path": str(hf.llama), "dataset_name": str(data), "learning_rate": 3e-3, "num_train_epochs": 2,
        "packing": True, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "use_peft": True,
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
        "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}, "warmup_steps": 0.2,
        "eval_strategy": "steps", "eval_steps": 3, "per_device_eval_batch_size": 3,
    }
    theirs = trl_log("sft", settings, tmp_path)
    config, notes = imported(settings, tmp_path)
    assert "converted as a `trl sft` config" in notes
    out = tmp_path / "ours"
    proc = run_cli("run", config, "--yes", "--set", "train.threads=1")
    assert proc.returncode == 0, proc.stderr
    assert "loss mask: none" in proc.stdout  # TRL's assistant_only_loss=False: every token of a conversation
    ours, evals = our_log(out)
    assert_same_run(ours, theirs, evals)


def saved_dataset_dict(path, rows, n_train):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows[:n_train]), "test": Dataset.from_list(rows[n_train:])}).save_to_disk(str(path))
    return path


def test_prompt_completion_dataset_dict_epochs_and_a_resume_as_trl_sft(registry, hf, tmp_path):
    """Prompt/completion rows in a ``save_to_disk`` DatasetDict (TRL trains the completions),
    shuffled, 3 epochs whose last steps are short (27 rows, 4 a micro-batch, 2 a step), evaluated on
    its test split: trainctl stopped at step 5 and resumed equals TRL's uninterrupted run."""
    data = saved_dataset_dict(tmp_path / "pc", hf_assets.prompt_completion_rows(36), 27)
    settings = COMMON | {
        "model_name_or_path": str(hf.llama), "dataset_name": str(data), "learning_rate": 3e-3, "num_train_epochs": 3,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine",
        "warmup_steps": 2, "eval_strategy": "steps", "eval_steps": 4, "gradient_checkpointing": False,
    }
    theirs = trl_log("sft", settings, tmp_path)
    config, _ = imported(settings, tmp_path)
    out = tmp_path / "ours"
    sets = ["train.threads=1", f"train.out_dir={out}"]

    def run(*extra, resume="never"):
        from trainctl.kernel import config as cfg

        return Run(cfg.load(config, registry, overrides=[*sets, *extra]), registry, resume=resume)

    first = run('plugins=["lr", "checkpoint", "jsonl", "script"]', "plugin.script.stop_at=[5]")
    assert first.fit().step == 5
    second = run('plugins=["lr", "checkpoint", "jsonl"]', resume="auto")
    assert second.resumed_from.endswith("step-000005")
    assert second.fit().status == "completed"
    ours, evals = our_log(out)
    assert_same_run(ours, theirs, evals)


def test_eval_and_save_per_epoch_as_trl_sft(hf, tmp_path):
    """``eval_strategy: epoch``, ``save_strategy: epoch``, ``save_total_limit: 2`` over 2.5 epochs of 4
    steps (27 rows, 4 a micro-batch, 2 a step): TRL evaluates and saves at steps 4, 8 and 10 (the
    cut last epoch ends at max_steps) and keeps the last two checkpoints; the converted run does the
    same, with the same eval losses."""
    data = saved_dataset_dict(tmp_path / "pc", hf_assets.prompt_completion_rows(36), 27)
    settings = COMMON | {
        "model_name_or_path": str(hf.llama), "dataset_name": str(data), "learning_rate": 3e-3, "num_train_epochs": 2.5,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "eval_strategy": "epoch",
        "save_strategy": "epoch", "save_total_limit": 2, "gradient_checkpointing": False,
    }
    theirs = trl_log("sft", settings, tmp_path)
    config, notes = imported(settings, tmp_path)
    assert "strategy" not in notes
    proc = run_cli("run", config, "--yes", "--set", "train.threads=1")
    assert proc.returncode == 0, proc.stderr
    assert "cadence: evaluate at each epoch's end (an epoch is 4 steps)" in proc.stdout
    ours, evals = our_log(tmp_path / "ours")
    assert [h["step"] for h in theirs if "eval_loss" in h] == [e["step"] for e in evals] == [4, 8, 10]
    assert_same_run(ours, theirs, evals)
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "trl_out").glob("checkpoint-*"))
    assert kept == [8, 10]
    events = [json.loads(line) for line in (tmp_path / "ours" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "save"] == [4, 8, 10]
    assert sorted(int(p.name.split("-")[1]) for p in (tmp_path / "ours" / "checkpoints").glob("step-*")) == kept


def test_dpo_as_trl_dpo(hf, tmp_path):
    """A ``trl dpo`` file with TRL's defaults (sigmoid loss, the frozen reference, dropout off,
    random order), over 2 epochs."""
    data = tmp_path / "pairs"
    data.mkdir()
    hf_assets.write_jsonl(data / "train.jsonl", pair_rows(20))
    settings = COMMON | {
        "model_name_or_path": str(hf.llama), "dataset_name": str(data), "learning_rate": 1e-3, "num_train_epochs": 2,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "beta": 0.2, "lr_scheduler_type": "linear",
        "gradient_checkpointing": False,
    }
    theirs = trl_log("dpo", settings, tmp_path)
    config, _ = imported(settings, tmp_path)
    proc = run_cli("run", config, "--yes", "--set", "train.threads=1")
    assert proc.returncode == 0, proc.stderr
    ours, _ = our_log(tmp_path / "ours")
    assert_same_run(ours, theirs)
