"""DPO on the hf backend (``[hf] objective = "dpo"``): per-step losses and reward metrics against a
plain ``DPOTrainer.train()`` (frozen copy with sigmoid, LoRA adapters off with ipo), the precomputed
reference cached in the run directory and reused across a ``trainctl ctl stop`` and resume, the
preference shapes TRL accepts, and 2 ranks under torchrun against one process.

Same batch order as TRL: ``data.shuffle = false`` (file order) and ``data.val_fraction = 0`` here,
``train_sampling_strategy = "sequential"`` there; the same seed (LoRA's initial adapter), the
transformers schedule by name and fused AdamW on both sides.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests import hf_assets
from tests.conftest import ROOT, make_config, run_cli
from tests.live import LiveRun
from trainctl.kernel.run import Run

STEPS, BATCH, ACCUM, LR, SEED, BETA = 4, 4, 2, 3e-3, 1234, 0.1
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
TRL_LIKE = [f"seed={SEED}", f"train.max_steps={STEPS}", "data.shuffle=false", "data.val_fraction=0.0", "optim.beta2=0.999",
            "plugin.lr.schedule='cosine'", "plugin.lr.family='transformers'", "plugin.lr.warmup_steps=2",
            "train.eval_interval=0", "hf.objective='dpo'", f"hf.dpo.beta={BETA}"]
LORA = ("hf.lora.r=4", "hf.lora.alpha=8")


def pair_rows(n: int = 48, form: str = "conversational") -> list[dict]:
    """Pairs from the embedded corpus: the next speech is chosen, a later one's opening rejected."""
    speeches = [s for _, s in hf_assets.speeches()]
    rows = []
    for i in range(n):
        asked, good, bad = speeches[i][:120], speeches[i + 1][:160], speeches[i + 7][:60]
        if form == "strings":
            rows.append({"prompt": asked + "\n", "chosen": good, "rejected": bad})
        elif form == "implicit":
            user = {"role": "user", "content": asked}
            rows.append({"chosen": [user, {"role": "assistant", "content": good}],
                         "rejected": [user, {"role": "assistant", "content": bad}]})
        else:
            rows.append({"prompt": [{"role": "user", "content": asked}], "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
    return rows


@pytest.fixture(scope="module")
def pairs(hf):
    return hf_assets.write_jsonl(hf.root / "pairs.jsonl", pair_rows())


def session(registry, hf, out, data, *extra, resume="never"):
    return Run(make_config(registry, out, *hf.sets(data, *extra), backend="hf"), registry, resume=resume)


def step_events(out):
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "step"]


def trl_log(hf, data, out, peft=None, loss_type="sigmoid", ref=None):
    """A plain ``DPOTrainer.train()`` on the same model, pairs, order, schedule and optimizer."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    kept = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                kept.append(dict(logs))

    torch.set_num_threads(1)
    args = DPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, seed=SEED, max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_length=128, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=2,
        weight_decay=0.0, adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch_fused", beta=BETA, loss_type=[loss_type],
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", eval_strategy="no",
        activation_checkpointing=False, report_to=[], disable_tqdm=True, log_level="error",
    )
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(hf.llama, dtype=torch.float32, attn_implementation="sdpa")
    ref_model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32, attn_implementation="sdpa") if ref else None
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows), peft_config=peft,
                         processing_class=AutoTokenizer.from_pretrained(hf.llama), callbacks=[Keep()])
    trainer.train()
    return kept


@pytest.mark.parametrize(("reference", "loss_type"), [("copy", "sigmoid"), ("adapters_off", "ipo")])
def test_losses_and_rewards_equal_dpo_trainer(registry, hf, pairs, tmp_path, reference, loss_type):
    lora = LORA if reference == "adapters_off" else ()
    s = session(registry, hf, tmp_path / "ours", pairs, 'plugins=["lr", "jsonl"]', *TRL_LIKE, *lora,
                f"hf.dpo.reference='{reference}'", f"hf.dpo.loss_type='{loss_type}'")
    assert s.plan.details["reference"] == reference
    assert s.fit().status == "completed"
    if lora:
        assert s.backend.pairs.ref_model is None  # no second copy: the adapter is switched off instead
    ours = step_events(tmp_path / "ours")
    peft = None
    if lora:
        from peft import LoraConfig

        peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules="all-linear")
    theirs = trl_log(hf, pairs, tmp_path / "trl", peft, loss_type=loss_type)
    assert len(ours) == len(theirs) == STEPS
    assert [e["loss"] for e in ours] == [t["loss"] for t in theirs]  # bit-identical, step by step
    assert [e["lr"] for e in ours] == pytest.approx([t["learning_rate"] for t in theirs], rel=1e-9, abs=1e-15)
    for name in REWARDS:  # TRL averages float64 host reads of each micro-batch, we float32 device shares
        assert [e["metrics"][name] for e in ours] == pytest.approx([t[name] for t in theirs], rel=1e-5, abs=1e-6), name
    assert theirs[-1]["rewards/margins"] != 0  # the policy moved away from its reference


def test_a_separate_reference_model_equals_dpo_trainers_ref_model(registry, hf, pairs, tmp_path):
    """``hf.dpo.ref_model`` is TRL's ``ref_model``: the log-ratios are taken against that model,
    held as a frozen copy or, precomputed, cached once; both equal ``DPOTrainer(ref_model=...)``."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = tmp_path / "reference"  # the tiny model with other weights: a reference that is not the start
    model = AutoModelForCausalLM.from_pretrained(hf.llama, dtype=torch.float32)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(ref)
    runs = {}
    for reference in ("copy", "precomputed"):
        out = tmp_path / reference
        s = session(registry, hf, out, pairs, 'plugins=["lr", "jsonl"]', *TRL_LIKE,
                    f"hf.dpo.reference='{reference}'", f"hf.dpo.ref_model='{ref}'")
        assert str(ref) in s.plan.details["reference"]
        assert s.fit().status == "completed"
        runs[reference] = [e["loss"] for e in step_events(out)]
    theirs = trl_log(hf, pairs, tmp_path / "trl", ref=str(ref))
    assert runs["copy"] == runs["precomputed"] == [t["loss"] for t in theirs]  # bit-identical, step by step
    start = trl_log(hf, pairs, tmp_path / "trl-start")  # against the starting weights: another run
    assert [t["loss"] for t in start] != runs["copy"]


def test_every_loss_type_is_dpo_trainers_compute_loss(registry, hf, pairs, tmp_path):
    """Each loss type offered, on one batch, against TRL's own ``_compute_loss`` (same model,
    reference and collated pairs): bit-identical."""
    import dataclasses

    import torch

    from trainctl.backends.hf.config import DPOConfig

    backend = session(registry, hf, tmp_path / "out", pairs, "plugins=[]", "hf.objective='dpo'").backend
    trainer, inputs = backend.pairs.trainer, backend._step_batches(0)[0].inputs
    with torch.no_grad():
        for loss_type, smoothing in (("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)):
            trainer.loss_types, trainer.label_smoothing = [loss_type], smoothing
            theirs = trainer._compute_loss(backend.model, dict(inputs), return_outputs=False)
            backend.hf = dataclasses.replace(backend.hf, dpo=DPOConfig(loss_type=loss_type, label_smoothing=smoothing))
            ours = backend._pair_loss(backend.model, inputs)[0].per_pair.mean()
            assert torch.equal(ours, theirs), (loss_type, ours, theirs)
    metrics = trainer._metrics["train"]  # and the reward metrics TRL logged for that batch
    loss, chosen, rejected = backend._pair_loss(backend.model, inputs)
    from trainctl.backends.hf.dpo_loss import reward_metrics

    for name, value in reward_metrics(loss, chosen, rejected).items():
        assert value.item() == metrics[name][-1], name


def test_precomputed_reference_is_cached_and_reused_across_ctl_stop(registry, hf, pairs, tmp_path):
    """The precomputed reference equals the frozen copy bit for bit (its batches are the steps'
    micro-batches in file order: 48 pairs, 4 a batch), and a run stopped by ``trainctl ctl stop``
    resumes on the cached log-probs, unchanged on disk, to the uninterrupted run's losses."""
    steps = [f"seed={SEED}", "optim.beta2=0.999", "plugin.lr.warmup_steps=1", "plugin.lr.decay_steps=1000", "data.shuffle=false", "hf.objective='dpo'",
             "train.eval_interval=0", "data.val_fraction=0.0", "data.packing=false"]  # lr: the same whatever max_steps
    whole = session(registry, hf, tmp_path / "copy", pairs, 'plugins=["lr", "jsonl"]', *steps, "train.max_steps=16",
                    "hf.dpo.reference='copy'")
    assert whole.plan.details["data"].startswith("48 train pairs, 48 kept;")
    assert whole.fit().status == "completed"
    reference = [e["loss"] for e in step_events(tmp_path / "copy")]

    out = tmp_path / "run"
    cached = out / "dpo_ref_logps.safetensors"
    args = ["--backend", "hf", str(ROOT / "configs" / "hf_tiny.toml")]
    ours = [*hf.sets(pairs), *steps, "hf.dpo.reference='precomputed'"]
    live = LiveRun(out, "train.max_steps=1000000", model=ours, args=args)
    try:
        live.wait(lambda s: s.get("state") == "running" and s.get("step", 0) >= 1)
        assert run_cli("ctl", str(out), "stop", timeout=60).returncode == 0
        assert live.exit_code() == 0
        first = live.output()
    finally:
        live.close()
    stopped = max(e["step"] for e in step_events(out))
    assert stopped < 16 and "precomputed from the starting weights, cached in" in first
    written = cached.stat().st_mtime_ns

    again = session(registry, hf, out, pairs, 'plugins=["lr", "checkpoint", "jsonl"]', *steps, "train.max_steps=16",
                    "hf.dpo.reference='precomputed'", resume="auto")
    assert again.resumed_from.endswith(f"step-{stopped:06d}")
    assert again.plan.details["reference"] == f"precomputed, read from {cached} (not recomputed)"
    assert again.fit().status == "completed"
    assert cached.stat().st_mtime_ns == written
    losses = {e["step"]: e["loss"] for e in step_events(out) if e["loss"] is not None}
    assert [losses[k] for k in range(1, 17)] == reference


@pytest.mark.parametrize("form", ["strings", "implicit"])
def test_preference_shapes_trl_accepts(registry, hf, tmp_path, form):
    if form == "strings":  # from Parquet, and implicit prompts from a saved-datasets directory, like SFT data
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = tmp_path / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(pair_rows(24, form)), data)
    else:
        from datasets import Dataset

        data = tmp_path / "saved"
        Dataset.from_list(pair_rows(24, form)).save_to_disk(str(data))
    out = tmp_path / "out"
    s = session(registry, hf, out, data, 'plugins=["checkpoint", "jsonl"]', "train.max_steps=2", "hf.objective='dpo'",
                "data.val_fraction=0.2")
    assert s.plan.details["objective"].endswith(("explicit-prompt pairs" if form == "strings" else "implicit-prompt pairs"))
    assert s.fit().status == "completed"
    first = s.backend.pairs.rows("train", [0])[0]
    assert first["prompt_ids"] and first["chosen_ids"] and first["rejected_ids"]
    assert all(e["loss"] is not None and set(REWARDS) <= set(e["metrics"]) for e in step_events(out))
    # evaluation: the DPO loss and reward accuracy on the fixed validation pairs, in the loop and
    # from the checkpoint (what `trainctl eval` and the remote eval worker run), bit for bit
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    val = next(e for e in events if e["event"] == "eval" and e["split"] == "val")
    assert 0 <= val["metrics"]["accuracy"] <= 1 and 0 < val["loss"] < 5
    from trainctl.evaluation import Evaluator

    evaluator = Evaluator(work_dir=tmp_path / "work", device="cpu", registry=registry)
    try:
        result = evaluator.evaluate(out / "checkpoints" / "step-000002")
    finally:
        evaluator.close()
    assert result.val_loss == val["loss"]


def test_bad_pairs_and_settings_are_one_line_errors(registry, hf, pairs, tmp_path):
    from trainctl.kernel.errors import ConfigError

    rows = pair_rows(8)
    rows[2]["rejected"] = rows[2]["chosen"]
    bad = hf_assets.write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = run_cli("run", "--yes", "--backend", "hf", "--out", str(tmp_path / "out"),
                   *[a for s in hf.sets(bad, "hf.objective='dpo'") for a in ("--set", s)])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "data.train line 3: chosen and rejected are identical" in proc.stderr and "bad.jsonl" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"needs a \[hf.lora\] adapter to switch off"):
        session(registry, hf, tmp_path / "a", pairs, "hf.objective='dpo'", "hf.dpo.reference='adapters_off'")
    with pytest.raises(ConfigError, match='used by loss_type = "robust" only'):
        session(registry, hf, tmp_path / "b", pairs, "hf.objective='dpo'", "hf.dpo.label_smoothing=0.1")
    with pytest.raises(ConfigError, match="data.packing is for objective"):
        session(registry, hf, tmp_path / "c", pairs, "hf.objective='dpo'", "data.packing='bfd'")
    sft_run = session(registry, hf, tmp_path / "sft", None, 'plugins=["checkpoint"]', "train.max_steps=1")
    assert sft_run.fit().status == "completed"
    sft_run.close()
    # the data files differ, so the kernel refuses first; with --force the backend still does
    config = make_config(registry, tmp_path / "sft", *hf.sets(pairs, "hf.objective='dpo'"), backend="hf")
    with pytest.raises(ConfigError, match="was trained with \\[hf\\] objective = 'sft', not 'dpo'"):
        Run(config, registry, resume="auto", force=True)


def test_two_ranks_under_torchrun_equal_one_process(registry, hf, pairs, tmp_path):
    from tests.live import sets
    from tests.test_distributed import HF_TOLERANCE, TORCHRUN, assert_close, env, losses

    # the precomputed reference: each rank computes every other batch, the ranks exchange them,
    # rank 0 writes the run directory's cache: the same bytes as one process's
    steps = ("train.max_steps=3", "plugin.lr.warmup_steps=1", "train.eval_interval=0", "hf.objective='dpo'",
             "hf.dpo.reference='precomputed'")
    assert session(registry, hf, tmp_path / "one", pairs, 'plugins=["lr", "checkpoint", "jsonl"]', *steps).fit().status == "completed"
    base = [*hf.sets(pairs, *steps), 'plugins=["lr", "checkpoint", "jsonl"]']
    proc = subprocess.run([*TORCHRUN, "-m", "trainctl", "run", "--yes", "--backend", "hf", "--out", str(tmp_path / "ddp"),
                           *sets(*base)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cache = "dpo_ref_logps.safetensors"
    assert "precomputed from the starting weights on 2 ranks, cached in" in proc.stdout
    assert (tmp_path / "ddp" / cache).read_bytes() == (tmp_path / "one" / cache).read_bytes()
    assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "one"), HF_TOLERANCE)
    one, ddp = step_events(tmp_path / "one"), step_events(tmp_path / "ddp")
    for name in REWARDS:
        assert [e["metrics"][name] for e in ddp] == pytest.approx([e["metrics"][name] for e in one], rel=1e-4, abs=1e-4)

    # the same under FSDP, with the frozen copy as reference and activation checkpointing: the
    # policy sharded over the ranks (train.parallel reaches DPO as it reaches SFT)
    copy = [s for s in steps if "reference" not in s]
    assert session(registry, hf, tmp_path / "one-copy", pairs, 'plugins=["lr", "checkpoint", "jsonl"]', *copy).fit().status == "completed"
    proc = subprocess.run([*TORCHRUN, "-m", "trainctl", "run", "--yes", "--backend", "hf", "--out", str(tmp_path / "fsdp"),
                           *sets(*hf.sets(pairs, *copy), 'plugins=["lr", "checkpoint", "jsonl"]', "train.parallel='fsdp'",
                                 "train.activation_checkpointing=true")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parallel: fsdp over 2 ranks" in proc.stdout and "reference: copy, sharded over the ranks" in proc.stdout
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "one-copy"), HF_TOLERANCE)
    # precomputed from the sharded policy: every forward a collective, so a rank with fewer
    # batches repeats one (the val split here is one batch); the cache is one process's, bit for bit
    proc = subprocess.run([*TORCHRUN, "-m", "trainctl", "run", "--yes", "--backend", "hf", "--out",
                           str(tmp_path / "fsdp-pre"), *sets(*base, "train.parallel='fsdp'", "train.max_steps=1")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "fsdp-pre" / cache).read_bytes() == (tmp_path / "one" / cache).read_bytes()


def test_plan_names_the_order_and_eval_loss_batches_weighs_batches_by_pairs(registry, hf, pairs, tmp_path):
    """The plan's run length says which order the pairs go in (as SFT's does); under
    ``train.eval_loss = "batches"`` each eval batch's mean is weighted by its pairs, as
    ``Trainer.evaluate()`` repeats it per row, so over uneven batches it is still the pair mean,
    and the evaluation says which mean it is."""
    common = ("plugins=[]", "hf.objective='dpo'", "train.eval_steps=0", "train.eval_batch_size=7", "data.order='trl'")
    s = session(registry, hf, tmp_path / "a", pairs, *common, "train.eval_loss='batches'")
    assert "shuffled as TRL's Trainer shuffles (data.order = \"trl\"" in s.plan.details["run length"]
    batches = s.backend.evaluate(0)
    tokens = session(registry, hf, tmp_path / "b", pairs, *common).backend.evaluate(0)
    assert batches["train"].tokens % 7  # the last batch is short: the weights matter
    for split, result in batches.items():
        assert (result.loss_mean, tokens[split].loss_mean) == ("batches", "tokens")
        assert result.loss == pytest.approx(tokens[split].loss, rel=1e-6)
