"""DPO pairs whose prompt alone fills ``model.max_length`` (``hf.dpo.too_long``), through the real
CLI: ``drop`` leaves them out as ``DPOTrainer`` does and cuts the rest as it does (per-step losses
bit-identical, and every metric TRL logs equal, under TRL's names, on the same run), the plan
counts them; ``error`` and a split left empty are one line, exit 2. And the DPO evaluation's
batches: ``train.eval_batch_size`` pairs each, ``train.eval_steps = 0`` the whole split, equal
to ``DPOTrainer.evaluate()``.
"""

from __future__ import annotations

import json

import pytest

from tests import hf_assets
from tests.conftest import run_cli
from tests.test_hf_dpo import STEPS, TRL_LIKE, pair_rows, session, trl_log

LONG = (3, 9, 10, 21, 33, 40)  # rows whose prompt is made far longer than model.max_length (128)
#: what DPOTrainer 1.16 logs each step besides loss, learning rate, grad norm and epoch
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens")


def long_prompt_rows(n: int = 48, long: tuple[int, ...] = LONG) -> list[dict]:
    rows = pair_rows(n)
    for i in long:
        rows[i]["prompt"][0]["content"] = " ".join([rows[i]["prompt"][0]["content"]] * 30)  # far past 128 tokens
    return rows


def cli(hf, out, data, *sets):
    return run_cli("run", "--yes", "--backend", "hf", "--out", str(out),
                   *[a for s in hf.sets(data, 'plugins=["lr", "jsonl"]', *TRL_LIKE, *sets) for a in ("--set", s)])


def step_events(out):
    return [e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == "step"]


def test_drop_leaves_out_what_dpo_trainer_drops_and_logs_its_metrics(hf, tmp_path):
    data = hf_assets.write_jsonl(tmp_path / "pairs.jsonl", long_prompt_rows())
    out = tmp_path / "ours"
    proc = cli(hf, out, data, "hf.dpo.too_long='drop'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: 48 train pairs, 42 kept; 0 val pairs" in proc.stdout
    assert ("dropped: 6 pairs dropped (6 train, 0 val): the prompt alone fills model.max_length 128 "
            "(hf.dpo.too_long = drop)") in proc.stdout
    ours = step_events(out)
    theirs = trl_log(hf, data, tmp_path / "trl")
    assert len(ours) == len(theirs) == STEPS
    assert [e["loss"] for e in ours] == [t["loss"] for t in theirs]  # bit-identical: the same 42 pairs, cut alike
    for name in TRL_METRICS:  # TRL: float64 means of host reads per micro-batch; here float32 device shares
        assert name in theirs[0], name  # DPOTrainer 1.16 does log it
        assert [e["metrics"][name] for e in ours] == pytest.approx([t[name] for t in theirs], rel=1e-5, abs=1e-6), name
    assert [e["metrics"]["num_tokens"] for e in ours] == [t["num_tokens"] for t in theirs]  # a count: exact
    assert ours[0]["metrics"]["logits/chosen"] != ours[0]["metrics"]["logits/rejected"]


def test_error_names_the_option_and_a_split_dropped_whole_is_one_line(hf, tmp_path):
    data = hf_assets.write_jsonl(tmp_path / "pairs.jsonl", long_prompt_rows())
    proc = cli(hf, tmp_path / "error", data)  # too_long = "error", the default
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "6 problem(s)" in proc.stderr and "data.train line 4: the prompt is " in proc.stderr
    assert 'or set hf.dpo.too_long = "drop" to leave such pairs out as TRL does' in proc.stderr

    every = hf_assets.write_jsonl(tmp_path / "all.jsonl", long_prompt_rows(8, long=tuple(range(8))))
    proc = cli(hf, tmp_path / "all", every, "hf.dpo.too_long='drop'")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert ('no train pairs are left: every prompt alone fills model.max_length 128, so hf.dpo.too_long = "drop" '
            "left them all out; raise model.max_length or shorten the prompts") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_batches_are_eval_batch_size_and_eval_steps_0_is_the_whole_split(registry, hf, tmp_path):
    """10 validation pairs, 3 a batch: 4 batches (3, 3, 3, 1) and every pair, scored against a
    reference that is not the start (so each pair's loss differs); the loss equals
    ``DPOTrainer.evaluate()``'s with ``per_device_eval_batch_size = 3``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ref = tmp_path / "reference"
    model = AutoModelForCausalLM.from_pretrained(hf.llama, dtype=torch.float32)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(ref)
    rows = pair_rows(22)
    train, val = (hf_assets.write_jsonl(tmp_path / f"{name}.jsonl", part) for name, part in (("t", rows[:12]), ("v", rows[12:])))
    s = session(registry, hf, tmp_path / "ours", train, "plugins=[]", f"data.val='{val}'", "hf.objective='dpo'",
                f"hf.dpo.ref_model='{ref}'", "train.eval_steps=0", "train.eval_batch_size=3")
    ours = s.backend.evaluate(0)
    assert [b.pairs for b in s.backend._eval_batches["val"]] == [3, 3, 3, 1] and ours["val"].tokens == 10
    assert ours["train"].tokens == 12  # every training pair too
    s.close()

    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, max_length=128, beta=0.1,
                     per_device_eval_batch_size=3, report_to=[], disable_tqdm=True, log_level="error")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(hf.llama, dtype=torch.float32, attn_implementation="sdpa"),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32, attn_implementation="sdpa"),
                         args=args, train_dataset=Dataset.from_list(rows[:12]), eval_dataset=Dataset.from_list(rows[12:]),
                         processing_class=AutoTokenizer.from_pretrained(hf.llama))
    theirs = trainer.evaluate()
    assert ours["val"].loss == pytest.approx(theirs["eval_loss"], rel=1e-6)


def test_num_tokens_counts_on_across_a_resume(registry, hf, tmp_path):
    """TRL's num_tokens is the attention-mask tokens trained so far; a resumed run counts the
    steps before its checkpoint too, so it logs what the uninterrupted run logs."""
    data = hf_assets.write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    steps = ('plugins=["checkpoint", "jsonl"]', "hf.objective='dpo'", "data.val_fraction=0.0", "train.eval_interval=0")
    whole = session(registry, hf, tmp_path / "whole", data, *steps, "train.max_steps=4")
    assert whole.fit().status == "completed"
    whole.close()
    first = session(registry, hf, tmp_path / "run", data, *steps, "train.max_steps=2")
    assert first.fit().status == "completed"
    first.close()
    again = session(registry, hf, tmp_path / "run", data, *steps, "train.max_steps=4", resume="auto")
    assert again.resumed_from.endswith("step-000002") and again.fit().status == "completed"
    again.close()
    counted = {e["step"]: e["metrics"]["num_tokens"] for e in step_events(tmp_path / "run")}
    assert [counted[s] for s in (1, 2, 3, 4)] == [e["metrics"]["num_tokens"] for e in step_events(tmp_path / "whole")]
    assert counted[1] < counted[2] < counted[3] < counted[4]
