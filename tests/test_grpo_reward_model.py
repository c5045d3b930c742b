"""The reward-model built-in (``hf.grpo.rewards = ["model"]``, ``hf.grpo.reward_model``) through the
real CLI: bad input is one line, exit 2, before the policy loads (the policy's weights are garbage,
as in ``test_grpo_cli.py``); the attacks on a folder someone else wrote are refused for real: a
pickle ``pytorch_model.bin`` whose payload would make a marker file (never made), a weight file
that is a symlink out of the folder, a FIFO (refused without blocking). ``trainctl eval`` of a checkpoint never opens its reward model."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest

from tests import hf_assets
from tests.conftest import run_cli
from tests.test_grpo_cli import broken_weights, grpo, one_line, prompts  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def scorer(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward_model") / "model"
    hf_assets.build_reward_model(out, hf.tokenizer)
    return out


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def copy(scorer, tmp_path):
    folder = tmp_path / "rm"
    shutil.copytree(scorer, folder)
    return folder


def test_bad_reward_model_input_is_one_line_before_the_policy_loads(hf, prompts, broken_weights, scorer, tmp_path):
    causal = hf.llama
    two_labels = copy(scorer, tmp_path)
    text = (two_labels / "config.json").read_text().replace('"0": "LABEL_0"', '"0": "LABEL_0", "1": "LABEL_1"')
    (two_labels / "config.json").write_text(text)
    cases = {
        "missing": ([f"hf.grpo.reward_model='{tmp_path / 'nope'}'"], "no such folder"),
        "not a folder": ([f"hf.grpo.reward_model='{prompts}'"], "is not a folder"),
        "a causal LM": ([f"hf.grpo.reward_model='{causal}'"], "'LlamaForCausalLM' checkpoint, not a transformers sequence-classification"),
        "two labels": ([f"hf.grpo.reward_model='{two_labels}'"], "has num_labels = 2"),
        "no model in rewards": ([f"hf.grpo.reward_model='{scorer}'", "hf.grpo.rewards=['tests.grpo_rewards:e_share']"],
                                'but rewards has no "model"'),
        "no reward_model": ([], 'rewards has "model" but reward_model is empty'),
    }
    for case, (overrides, expected) in cases.items():
        line = one_line(grpo(hf, tmp_path / case, prompts, "hf.grpo.rewards=['model']", *overrides, model=broken_weights))
        assert expected in line, (case, line)
        assert "safetensors" not in line  # the policy's weights were never read


def test_pickle_weights_are_refused_and_never_run(hf, prompts, scorer, tmp_path):
    folder = copy(scorer, tmp_path)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    line = one_line(grpo(hf, tmp_path / "out", prompts, "hf.grpo.rewards=['model']", f"hf.grpo.reward_model='{folder}'"))
    assert "no safetensors weights (pytorch_model.bin)" in line and "pickle weights are never loaded" in line, line
    # beside safetensors, the pickle is never offered to transformers: the run trains, nothing runs
    shutil.copy(scorer / "model.safetensors", folder / "model.safetensors")
    proc = grpo(hf, tmp_path / "out2", prompts, "hf.grpo.rewards=['model']", f"hf.grpo.reward_model='{folder}'")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the control: the payload does make the marker
    assert marker.exists()


def test_a_symlink_out_of_the_folder_and_a_fifo_are_refused(hf, prompts, scorer, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(scorer / "model.safetensors", outside)
    linked = copy(scorer, tmp_path)
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(outside)
    line = one_line(grpo(hf, tmp_path / "out", prompts, "hf.grpo.rewards=['model']", f"hf.grpo.reward_model='{linked}'"))
    assert "model.safetensors is a symbolic link; a reward model folder holds only regular files" in line, line
    fifo = tmp_path / "fifo"
    shutil.copytree(scorer, fifo)
    (fifo / "tokenizer.json").unlink()
    os.mkfifo(fifo / "tokenizer.json")
    proc = grpo(hf, tmp_path / "out2", prompts, "hf.grpo.rewards=['model']", f"hf.grpo.reward_model='{fifo}'")
    line = one_line(proc)  # run_cli's timeout would fail the test had the open blocked
    assert "tokenizer.json is not a regular file" in line, line


def test_evaluating_a_checkpoint_never_opens_its_reward_model(hf, prompts, scorer, tmp_path):
    """A run trained with a reward model, whose folder is then swapped for a FIFO: ``trainctl eval``
    of its checkpoint answers (opening the FIFO would block it) and never names the folder."""
    folder = copy(scorer, tmp_path)
    proc = grpo(hf, tmp_path / "out", prompts, "hf.grpo.rewards=['model']", f"hf.grpo.reward_model='{folder}'")
    assert proc.returncode == 0, proc.stderr
    [ckpt] = (tmp_path / "out" / "checkpoints").iterdir()
    shutil.rmtree(folder)
    os.mkfifo(folder)
    local = run_cli("eval", str(ckpt), "--json", timeout=120)
    assert local.returncode == 0, local.stdout + local.stderr
    assert str(folder) not in local.stdout + local.stderr


def test_a_weight_file_swapped_after_the_check_is_not_what_loads(hf, scorer, tmp_path, monkeypatch):
    """The folder's model.safetensors is replaced by another model's while the tokenizer loads
    (after the files were opened, before the weights are read): the checked weights load."""
    import torch
    from transformers import AutoTokenizer

    from trainctl.backends.hf import reward_model

    folder = copy(scorer, tmp_path)
    hf_assets.build_reward_model(tmp_path / "other", hf.tokenizer, seed=5)
    load_tokenizer = AutoTokenizer.from_pretrained

    def swap_then_load(*args, **kwargs):
        os.replace(tmp_path / "other" / "model.safetensors", folder / "model.safetensors")
        return load_tokenizer(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", swap_then_load)
    model, _ = reward_model.load(reward_model.check(str(folder)), dtype=torch.float32, device="cpu")
    from safetensors.torch import load_file

    checked, swapped = load_file(scorer / "model.safetensors"), load_file(folder / "model.safetensors")
    name = "score.weight"
    assert not torch.equal(checked[name], swapped[name])  # the swap happened
    assert torch.equal(model.state_dict()[name], checked[name])
