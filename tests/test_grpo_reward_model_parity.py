"""A GRPO run scored by the reward-model built-in equals TRL's ``GRPOTrainer(reward_funcs=[DIR])``,
which loads the same folder itself (``AutoModelForSequenceClassification(num_labels=1)`` and its
tokenizer): over 4 steps on a tiny Qwen3 policy and a tiny random Llama reward model, every
step's loss, rewards, KL, clip ratios and gradient norm are bit-identical. The folder is named
``model``, so TRL's name for it (the folder's) is ours (``rewards/model/mean``)."""

from __future__ import annotations

import json

from tests import hf_assets
from tests.conftest import make_config
from trainctl.kernel.run import Run

STEPS, SEED = 4, 7
COMPARED = ("loss", "kl", "reward", "reward_std", "rewards/model/mean", "rewards/model/std", "clip_ratio/region_mean",
            "completions/mean_length", "grad_norm")


def test_reward_model_grpo_equals_trl(registry, hf, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    hf_assets.build_model(tmp_path / "qwen3", hf.tokenizer, arch="qwen3")
    hf_assets.build_reward_model(tmp_path / "model", hf.tokenizer)
    rows = [{"prompt": speech[:40]} for _, speech in hf_assets.speeches(16)]
    prompts = hf_assets.write_jsonl(tmp_path / "prompts.jsonl", rows)

    torch.set_num_threads(1)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), seed=SEED, use_cpu=True, max_steps=STEPS, lr_scheduler_type="constant",
                      weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
                      dataloader_num_workers=0, activation_checkpointing=False, bf16=False, per_device_train_batch_size=4,
                      gradient_accumulation_steps=2, num_generations=4, max_completion_length=8, num_iterations=2,
                      beta=0.04, learning_rate=1e-3)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3"), reward_funcs=[str(tmp_path / "model")],
                          args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(tmp_path / "qwen3"))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]

    out = tmp_path / "ours"
    config = make_config(
        registry, out, 'plugins=["jsonl"]', f"seed={SEED}", f"model.name_or_path='{tmp_path / 'qwen3'}'",
        f"data.train='{prompts}'", "model.max_length=128", f"train.max_steps={STEPS}", "train.batch_size=4",
        "train.grad_accum=2", "train.device='cpu'", "train.threads=1", "train.log_interval=1", "train.eval_interval=0",
        "optim.lr=1e-3", "optim.weight_decay=0.0", "optim.beta2=0.999", "optim.implementation='fused'",
        "hf.objective='grpo'", "hf.grpo.rewards=['model']", f"hf.grpo.reward_model='{tmp_path / 'model'}'",
        "hf.grpo.num_generations=4", "hf.grpo.max_completion_length=8", "hf.grpo.num_iterations=2", "hf.grpo.beta=0.04",
        backend="hf",
    )
    result = Run(config, registry, resume="never").fit()
    assert result.status == "completed", result.reason
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    ours = [e | e["metrics"] for e in events if e["event"] == "step"]
    assert len(ours) == len(theirs) == STEPS
    assert len({h["rewards/model/mean"] for h in theirs if "rewards/model/mean" in h}) > 1  # the model scores, and varies
    for name in COMPARED:
        assert [s.get(name) for s in ours] == [h.get(name) for h in theirs], name  # bit for bit
