"""Bad GRPO input through the real CLI (``hf.objective = "grpo"``): one line on stderr naming the
problem and the fix, exit 2, no traceback.

What the config alone or the data can refuse is refused before the model loads. That is shown
with a model directory whose ``config.json`` is sound (the memory plan reads it) but whose
weights are garbage: had the model loaded first, the run would have failed on the weights
instead. ``test_the_broken_weights_are_reported_when_nothing_else_is_wrong`` is the control. What
only a generation can show (a reward that raises, returns NaN or the wrong length) is reported at
the first step, naming the reward.
"""

from __future__ import annotations

import shutil

import pytest

from tests import hf_assets
from tests.conftest import run_cli

GOOD = "tests.grpo_rewards:e_share"


@pytest.fixture(scope="module")
def prompts(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_cli")
    rows = [{"prompt": speech[:40], "answer": speaker} for speaker, speech in hf_assets.speeches(16)]
    return hf_assets.write_jsonl(root / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def broken_weights(hf, tmp_path_factory):
    """The tiny model with its weights file overwritten: config.json and the tokenizer still read."""
    model = tmp_path_factory.mktemp("broken") / "llama"
    shutil.copytree(hf.llama, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file" * 64)
    return model


def grpo(hf, out, data, *extra: str, model=None):
    sets = hf.sets(data, 'hf.objective="grpo"', "train.max_steps=1", "train.eval_interval=0", "data.val_fraction=0",
                   "hf.grpo.num_generations=4", "hf.grpo.max_completion_length=4", *extra)
    if model is not None:
        sets.append(f"model.name_or_path='{model}'")
    return run_cli("run", "--yes", "--backend", "hf", "--out", str(out), *[a for item in sets for a in ("--set", item)],
                   timeout=300)


def one_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("trainctl: error: "), lines[0]
    return lines[0]


# (overrides, what the line must say: the problem and the fix)
BEFORE_THE_MODEL = {
    "no reward": (["hf.grpo.rewards=[]"], ("hf.grpo.rewards is empty", "name at least one reward")),
    "unknown name": (["hf.grpo.rewards=['accuracy']"], ("unknown reward 'accuracy'", '"package.module:function"')),
    "missing function": (["hf.grpo.rewards=['tests.grpo_rewards:nope']"],
                         ("tests.grpo_rewards has no function 'nope'", "fix the name")),
    "module does not import": (["hf.grpo.rewards=['no_such_package.rewards:score']"],
                               ("cannot import no_such_package.rewards", "install it or fix the name")),
    "format without a pattern": (["hf.grpo.rewards=['format']"], ("hf.grpo.format_pattern is empty", "format_pattern =")),
    "exact_match without the column": (["hf.grpo.rewards=['exact_match']", "hf.grpo.answer_column='solution'"],
                                       ("no column 'solution'", "set hf.grpo.answer_column")),
    "num_generations does not divide": ([f"hf.grpo.rewards=['{GOOD}']", "hf.grpo.num_generations=3"],
                                        ("num_generations 3 does not divide the generation batch 8",
                                         "make the batch a multiple of it")),
    "prompt column missing": ([f"hf.grpo.rewards=['{GOOD}']", "hf.grpo.prompt_column='question'"],
                              ("has no column 'question'", "set hf.grpo.prompt_column")),
    "num_generations < 2": ([f"hf.grpo.rewards=['{GOOD}']", "hf.grpo.num_generations=1"],
                            ("hf.grpo", "num_generations must be at least 2")),
    "reward_weights of the wrong length": ([f"hf.grpo.rewards=['{GOOD}']", "hf.grpo.reward_weights=[1.0, 0.5]"],
                                           ("hf.grpo", "reward_weights has 2 weights for 1 rewards",
                                            "give one per reward or none")),
    "a plugin that is no reward": (["hf.grpo.rewards=['lr']"],
                                   ("unknown reward 'lr'", "an enabled plugin that implements trainctl_reward")),
}


@pytest.mark.parametrize("case", sorted(BEFORE_THE_MODEL))
def test_bad_input_is_one_line_before_the_model_loads(hf, prompts, broken_weights, tmp_path, case):
    overrides, expected = BEFORE_THE_MODEL[case]
    line = one_line(grpo(hf, tmp_path / "out", prompts, *overrides, model=broken_weights))
    for part in expected:
        assert part in line, line
    assert "safetensors" not in line  # the weights were never read
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_broken_weights_are_reported_when_nothing_else_is_wrong(hf, prompts, broken_weights, tmp_path):
    proc = grpo(hf, tmp_path / "out", prompts, f"hf.grpo.rewards=['{GOOD}']", model=broken_weights)
    assert proc.returncode != 0 and "safetensors" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


AT_THE_FIRST_GENERATION = {
    "raises": ("tests.grpo_rewards:raises", "raised RuntimeError: the grader is down; fix the function"),
    "NaN": ("tests.grpo_rewards:nan", "returned a NaN or infinite value; return finite floats"),
    "wrong length": ("tests.grpo_rewards:short", "returned 7 values for 8 completions; it must return one float per completion"),
}


@pytest.mark.parametrize("case", sorted(AT_THE_FIRST_GENERATION))
def test_a_reward_that_fails_is_one_line_naming_it(hf, prompts, tmp_path, case):
    name, expected = AT_THE_FIRST_GENERATION[case]
    line = one_line(grpo(hf, tmp_path / "out", prompts, f"hf.grpo.rewards=['{name}']"))
    assert f"reward '{name}' {expected}" in line, line
