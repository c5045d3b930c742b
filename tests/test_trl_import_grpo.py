"""``trainctl config import-trl`` of a ``trl grpo --config`` YAML: the file is told apart from SFT
and DPO (``beta`` is DPO's and GRPO's), every ``[hf.grpo]`` key is written from ``GRPOConfig``'s
defaults where the file is silent, TRL's defaults that are not trainctl's are written out (bf16,
gradient checkpointing, the learning rate, the loss type), ``reward_funcs`` map where trainctl has
the same reward, and what has no equivalent is reported one line per key."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tests.conftest import run_cli
from trainctl.backends.hf import config as hf_config
from trainctl.backends.hf import trl_config, trl_grpo_config

YAML = """\
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
dataset_name: trl-lib/DeepMath-103K
reward_funcs: [think_format_reward, accuracy_reward]
reward_weights: [0.5, 1.0]
num_generations: 4
max_completion_length: 256
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
beta: 0.04
epsilon_high: 0.28
loss_type: dr_grpo
scale_rewards: false
max_steps: 100
use_vllm: true
log_completions: true
"""


def test_a_grpo_yaml_becomes_the_grpo_objective_with_trls_defaults_written(tmp_path):
    source = tmp_path / "grpo.yaml"
    source.write_text(YAML)
    proc = run_cli("config", "import-trl", str(source), "-o", str(tmp_path / "grpo.toml"), check=True)
    import tomllib

    tables = tomllib.loads((tmp_path / "grpo.toml").read_text())
    assert tables["hf"]["objective"] == "grpo"  # not dpo, though it sets beta
    grpo = tables["hf"]["grpo"]
    assert grpo == {
        "num_generations": 4, "max_completion_length": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "beta": 0.04,
        "epsilon": 0.2, "epsilon_high": 0.28, "num_iterations": 1, "mask_truncated_completions": False,
        "importance_sampling_level": "token", "steps_per_generation": 0, "loss_type": "dr_grpo", "scale_rewards": "none",
        "rewards": ["format"], "format_pattern": r"<think>(?!.*<think>)(.*?)</think>.*", "reward_weights": [0.5],
    }
    # GRPOConfig's defaults that are not trainctl's, written out
    assert tables["optim"]["lr"] == 1e-6 and tables["train"]["dtype"] == "bfloat16"
    assert tables["model"]["gradient_checkpointing"] is True and "max_length" not in tables["model"]
    assert (tables["train"]["max_steps"], tables["train"]["batch_size"], tables["train"]["grad_accum"]) == (100, 4, 2)
    assert tables["data"]["val_fraction"] == 0.0 and "epochs" not in tables["data"] and "mask" not in tables["data"]
    notes = proc.stderr
    assert "reward_funcs: 'accuracy_reward' not converted (it verifies maths with math_verify" in notes
    assert "use_vllm: not converted (trainctl generates with transformers' generate" in notes
    assert "log_completions: not converted (no trainctl equivalent)" in notes
    loaded = run_cli("config", "show", str(tmp_path / "grpo.toml"))  # the tables are a valid hf config
    assert loaded.returncode == 0, loaded.stderr


def test_grpo_defaults_are_trls():
    from trl import GRPOConfig

    fields = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for name, value in trl_grpo_config.TRL_GRPO_DEFAULTS.items():
        assert fields[name] == value, name
    assert fields["bf16"] is None and trl_config.TRL_DEFAULTS["bf16"] is True  # None: bf16 unless fp16
    assert fields["gradient_checkpointing"] is True and fields["max_steps"] == -1


def test_every_hf_grpo_key_from_trl_is_written_and_loads():
    tables, _ = trl_config.convert({"num_generations": 4, "max_steps": 10})
    ours = {f.name for f in dataclasses.fields(hf_config.GRPOConfig)} - {"prompt_column", "answer_column", "format_pattern",
                                                                       "reward_model"}
    # asynchronous generation's keys: GRPOTrainer is synchronous (max_staleness stays 0, no rollout
    # workers), and the importance-sampling keys are written only when a file sets TRL's vllm_* ones
    ours -= {"max_staleness", "rollout_workers", *trl_grpo_config.TRL_IMPORTANCE.values()}
    assert set(tables["hf"]["grpo"]) == ours
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in tables["hf"]["grpo"].items()}
    assert hf_config.GRPOConfig(**options).loss_type == "dapo"  # TRL's default loss, and TRL's beta 0
    assert tables["hf"]["grpo"]["beta"] == 0.0


def test_the_mapped_format_reward_scores_as_trls():
    from trl.rewards import think_format_reward

    from trainctl.backends.hf import rewards

    pattern = trl_grpo_config.TRL_REWARDS["think_format_reward"][1]["format_pattern"]
    ours = rewards.format_reward(pattern)
    texts = ["<think>\nreasoning\n</think>\nanswer", "<think>no end", "x<think>a</think>", "<think>a</think>",
             "<think>a<think>b</think>c", "<think>a</think>b\n\nc</think>", "", "<think></think>\n"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    assert ours([""] * len(texts), completions, [{}] * len(texts)) == think_format_reward(completions)


@pytest.mark.parametrize(("settings", "note"), [
    ({"reward_funcs": ["my_lib.rewards.score"]},
     "reward_funcs: 'my_lib.rewards.score' not converted (trainctl calls a reward as f(prompts, completions, rows); "
     'once it takes those, name it "my_lib.rewards:score" in hf.grpo.rewards)'),
    ({"num_generations": 4}, "hf.grpo.rewards: empty, and the run refuses that"),
    ({"num_generations": 4}, 'num_train_epochs: 3.0 not converted (objective = "grpo" runs train.max_steps steps'),
    ({"loss_type": "cispo"}, "loss_type: 'cispo' not converted (trainctl runs grpo, dr_grpo, dapo, bnpo)"),
    ({"num_generations": 4, "eval_strategy": "steps"}, "eval_strategy: 'steps' not converted (objective = \"grpo\""),
    ({"reward_model_name_or_path": "some/rm"}, "reward_model_name_or_path: 'some/rm' looks like a hub id; "
                                               "hf.grpo.reward_model loads a local folder only"),
    ({"num_generations": 4, "vllm_mode": "colocate"}, "vllm_mode: not converted (no trainctl equivalent)"),
    ({"num_generations": 4, "disable_dropout": True}, "disable_dropout: true not converted"),
])
def test_what_does_not_map_is_reported(settings, note):
    tables, notes = trl_config.convert(settings)
    assert tables["hf"]["objective"] == "grpo"
    assert any(n.startswith(note) for n in notes), notes


def test_the_generation_batch_becomes_steps_per_generation_and_grpo_can_be_forced():
    tables, _ = trl_config.convert({"generation_batch_size": 24, "per_device_train_batch_size": 4, "num_generations": 4})
    assert tables["hf"]["grpo"]["steps_per_generation"] == 6
    forced, notes = trl_config.convert({"learning_rate": 1e-5}, "grpo")
    assert forced["hf"]["objective"] == "grpo" and not any("converted as a `trl sft` config" in n for n in notes)
    assert trl_config.trainer_of({"beta": 0.1}) == "dpo" and trl_config.trainer_of({"beta": 0.1, "num_generations": 8}) == "grpo"


def test_a_converted_grpo_config_trains(hf, tmp_path):
    source = tmp_path / "grpo.yaml"
    source.write_text("reward_funcs: [think_format_reward]\nnum_generations: 4\nmax_completion_length: 4\n"
                      "per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\nmax_steps: 1\nbf16: false\n"
                      "gradient_checkpointing: false\nuse_cpu: true\n")
    run_cli("config", "import-trl", str(source), "-o", str(tmp_path / "grpo.toml"), check=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Speak {i}:"}}\n' for i in range(8)))
    sets = [f"model.name_or_path='{hf.llama}'", f"data.train='{prompts}'", "train.threads=1"]
    proc = run_cli("run", str(tmp_path / "grpo.toml"), "--yes", "--out", str(tmp_path / "out"),
                   *[a for s in sets for a in ("--set", s)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"rewards\s*:?\s*format x 1", proc.stdout), proc.stdout


def test_the_reward_model_becomes_the_model_builtin_first_as_the_script_puts_it(tmp_path):
    """``trl grpo`` puts ``reward_model_name_or_path`` before ``reward_funcs`` (so its weight is
    the first of ``reward_weights``): it becomes ``"model"`` first, with ``hf.grpo.reward_model``,
    and the written file loads."""
    source = tmp_path / "grpo.yaml"
    source.write_text("reward_model_name_or_path: ./rm\nreward_funcs: [think_format_reward, accuracy_reward]\n"
                      "reward_weights: [2.0, 0.5, 1.0]\nnum_generations: 4\nmax_steps: 10\n")
    proc = run_cli("config", "import-trl", str(source), "-o", str(tmp_path / "grpo.toml"), check=True)
    import tomllib

    grpo = tomllib.loads((tmp_path / "grpo.toml").read_text())["hf"]["grpo"]
    assert (grpo["rewards"], grpo["reward_weights"], grpo["reward_model"]) == (["model", "format"], [2.0, 0.5], "./rm")
    assert "reward_model_name_or_path" not in proc.stderr
    loaded = run_cli("config", "show", str(tmp_path / "grpo.toml"))
    assert loaded.returncode == 0, loaded.stderr
