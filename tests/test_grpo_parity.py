"""Synchronous GRPO on trainctl is TRL's ``GRPOTrainer(use_vllm=False).train()``: on a tiny local
Qwen3 with the same seed, prompts and reward, every step's loss, KL, clip ratios, rewards and
entropy are bit-identical over 10 steps for each of TRL's loss types grpo, dr_grpo, dapo and
bnpo, and every completion is token-identical. Each generation is trained on twice
(``num_iterations = 2``), so the clipped ratios are not trivially zero, and ``beta`` > 0 so the
KL is measured against TRL's own reference copy; the gradient norms are equal too. On 8 prompts
the 10 steps cross an epoch, and the second pass's prompt order is TRL's too.

Two of TRL's defaults are not trainctl's and are set to ours in the reference run: ``bf16=True``
(``GRPOConfig`` turns on bf16 autocast even on the CPU; trainctl's CPU runs are float32, and
under it every log-prob moves by ~1e-3) and ``gradient_checkpointing=True`` (trainctl's is
``model.gradient_checkpointing``, off by default)."""

from __future__ import annotations

import json

import pytest

from tests import grpo_rewards, hf_assets
from tests.conftest import make_config
from trainctl.backends.hf import rewards
from trainctl.kernel.run import Run

STEPS, SEED, REWARD = 10, 7, "tests.grpo_rewards:recorded"
SHAPE = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_generations": 4,
         "max_completion_length": 8, "num_iterations": 2, "beta": 0.04, "learning_rate": 1e-3}
COMPARED = ("loss", "kl", "entropy", "reward", "reward_std", f"rewards/{REWARD}/mean", f"rewards/{REWARD}/std",
            "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length")


@pytest.fixture(scope="module")
def qwen3(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    hf_assets.build_model(root / "qwen3", hf.tokenizer, arch="qwen3")
    rows = [{"prompt": speech[:40], "speaker": speaker} for speaker, speech in hf_assets.speeches(32)]
    return root / "qwen3", hf_assets.write_jsonl(root / "prompts.jsonl", rows), rows


def trl_run(model_dir, rows, loss_type, out) -> tuple[list[dict], list]:
    """TRL's own loop: its log history (one entry per step) and the completion ids it scored."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    grpo_rewards.SEEN.clear()
    torch.set_num_threads(1)  # as train.threads = 1 sets it for ours: the same kernels, the same sums
    args = GRPOConfig(output_dir=str(out), seed=SEED, use_cpu=True, loss_type=loss_type, max_steps=STEPS,
                      lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, report_to=[],
                      save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, activation_checkpointing=False, bf16=False, **SHAPE)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=[rewards.for_trl(REWARD, grpo_rewards.recorded)], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], list(grpo_rewards.SEEN)


def our_run(registry, model_dir, prompts, loss_type, out) -> tuple[list[dict], list]:
    grpo_rewards.SEEN.clear()
    config = make_config(
        registry, out, 'plugins=["jsonl"]', f"seed={SEED}", f"model.name_or_path='{model_dir}'", f"data.train='{prompts}'",
        "model.max_length=128", f"train.max_steps={STEPS}", "train.batch_size=4", "train.grad_accum=2",
        "train.device='cpu'", "train.threads=1", "train.log_interval=1", "train.eval_interval=0",
        f"optim.lr={SHAPE['learning_rate']}", "optim.weight_decay=0.0", "optim.beta2=0.999", "optim.implementation='fused'",
        "hf.objective='grpo'", f"hf.grpo.rewards=['{REWARD}']", "hf.grpo.num_generations=4",
        "hf.grpo.max_completion_length=8", f"hf.grpo.num_iterations={SHAPE['num_iterations']}", f"hf.grpo.beta={SHAPE['beta']}",
        f"hf.grpo.loss_type='{loss_type}'", backend="hf",
    )
    result = Run(config, registry, resume="never").fit()
    assert result.status == "completed", result.reason
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps = [e | e["metrics"] for e in events if e["event"] == "step"]
    rollouts = [e for e in events if e["event"] == "rollout"]
    reuse = SHAPE["num_iterations"]
    assert [r["staleness"] for r in rollouts] == list(range(reuse)) * (STEPS // reuse)  # each generation trained on num_iterations times
    return steps, list(grpo_rewards.SEEN)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_grpo_equals_trl_step_for_step(registry, qwen3, tmp_path, loss_type):
    model_dir, prompts, rows = qwen3
    theirs, their_completions = trl_run(model_dir, rows, loss_type, tmp_path / "trl")
    ours, our_completions = our_run(registry, model_dir, prompts, loss_type, tmp_path / "ours")
    assert len(ours) == len(theirs) == STEPS
    assert our_completions == their_completions and len(our_completions) == STEPS // SHAPE["num_iterations"]
    for name in COMPARED:
        mine = [step.get(name) for step in ours]
        reported = [h.get(name) for h in theirs]
        assert mine == reported, name  # bit for bit (None where neither logged it: no generation that step)
    assert any(h["clip_ratio/region_mean"] > 0 for h in theirs) and all(h["kl"] >= 0 for h in theirs)
    assert [s["grad_norm"] for s in ours] == [h["grad_norm"] for h in theirs]


def test_grpo_equals_trl_across_an_epoch(registry, qwen3, tmp_path):
    """8 prompts are a pass of 8 steps: steps 9 and 10 draw RepeatSampler's second order from
    the generator the first pass left, as ``train()``'s second epoch over its one dataloader does."""
    model_dir, _, rows = qwen3
    prompts = hf_assets.write_jsonl(tmp_path / "eight.jsonl", rows[:8])
    theirs, their_completions = trl_run(model_dir, rows[:8], "dapo", tmp_path / "trl")
    ours, our_completions = our_run(registry, model_dir, prompts, "dapo", tmp_path / "ours")
    assert our_completions == their_completions
    for name in COMPARED:
        assert [step.get(name) for step in ours] == [h.get(name) for h in theirs], name
