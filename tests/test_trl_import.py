"""``trainctl config import-trl``: what each TRL setting becomes, so the converted run trains what
``trl sft`` / ``trl dpo`` would (the runs themselves are compared in test_trl_parity.py), and the
hints a TRL user gets from ``trainctl run``."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import run_cli
from trainctl.backends.hf import trl_config
from trainctl.backends.hf.backend import resolve_mask


def converted(**settings):
    return trl_config.convert(settings)


@pytest.mark.parametrize(("settings", "mask"), [
    ({}, "trl"), ({"assistant_only_loss": True}, "assistant_only"), ({"completion_only_loss": False}, "none"),
    ({"completion_only_loss": True}, "trl"),
])
def test_the_mask_is_trls_for_the_datas_shape(settings, mask):
    assert converted(**settings)[0]["data"]["mask"] == mask


def test_trl_mask_resolves_as_sftconfig_defaults():
    # SFTConfig: assistant_only_loss=False trains every token of a conversation; completion_only_loss=None
    # trains the completion where the rows have one
    assert [resolve_mask(shape, "trl") for shape in ("messages", "prompt_completion", "text")] == \
        ["none", "completion_only", "none"]


def test_evaluation_takes_the_scripts_test_split_with_trls_eval_loss():
    tables, _ = converted(dataset_name="trl-lib/Capybara", eval_strategy="steps", logging_steps=5)
    data, train = tables["data"], tables["train"]
    assert (data["val"], data["val_split"], "val_fraction" in data) == ("trl-lib/Capybara", "test", False)
    assert (train["eval_interval"], train["eval_loss"], train["eval_steps"], train["eval_batch_size"]) == (5, "batches", 0, 8)
    named, _ = converted(dataset_name="d", eval_strategy="steps", eval_steps=7, dataset_test_split="validation",
                         per_device_eval_batch_size=3)
    assert (named["data"]["val_split"], named["train"]["eval_interval"], named["train"]["eval_batch_size"]) == ("validation", 7, 3)
    quiet, _ = converted(dataset_name="d", dataset_test_split="validation")  # eval_strategy "no": nothing held out
    assert quiet["data"]["val_fraction"] == 0.0 and "val" not in quiet["data"]


def test_epoch_strategies_carry_over():
    tables, notes = converted(dataset_name="d", eval_strategy="epoch", save_strategy="epoch", save_total_limit=2)
    train = tables["train"]
    assert (train["eval_strategy"], train["save_strategy"], tables["plugin"]["checkpoint"]["keep_last"]) == ("epoch", "epoch", 2)
    assert "eval_interval" not in train and "save_interval" not in train
    assert not any("strategy" in n for n in notes)
    steps, _ = converted(dataset_name="d", eval_strategy="steps", eval_steps=3)
    assert "eval_strategy" not in steps["train"] and steps["train"]["save_interval"] == 500
    delayed, notes = converted(dataset_name="d", eval_strategy="epoch", eval_delay=2)
    assert any(n.startswith("eval_delay: 2 not converted") for n in notes)


def test_one_file_has_no_test_split():
    tables, notes = converted(dataset_name="data/train.jsonl", eval_strategy="steps", eval_steps=5)
    assert "val" not in tables["data"] and tables["data"]["val_fraction"] == 0.0
    assert any("is one file, whose only split is 'train'" in n for n in notes)


def test_order_is_the_trainers_seeded_sampler():
    tables, _ = converted(data_seed=11)
    assert (tables["data"]["shuffle"], tables["data"]["order"], tables["data"]["order_seed"]) == (True, "trl", 11)
    sequential, _ = converted(train_sampling_strategy="sequential")
    assert sequential["data"]["shuffle"] is False


def test_settings_with_a_trainctl_way_say_it():
    tables, notes = converted(resume_from_checkpoint="out/checkpoint-100", load_best_model_at_end=True, warmup_ratio=0.1)
    assert any(n.startswith("resume_from_checkpoint: not converted (trainctl run resumes the newest checkpoint") and "--resume" in n
               for n in notes)
    assert tables["plugin"]["checkpoint"]["save_best"] is True
    assert any(n.startswith("load_best_model_at_end: converted as plugin.checkpoint.save_best") for n in notes)
    assert tables["plugin"]["lr"]["warmup_ratio"] == 0.1
    assert any("warmup_ratio: transformers 5 removed it and `trl sft` refuses it" in n for n in notes)


@pytest.mark.parametrize(("optim", "name", "implementation"), [
    (None, "adamw", "fused"), ("adamw_torch", "adamw", "default"), ("adamw_torch_fused", "adamw", "fused"),
    ("sgd", "sgd", None), ("adafactor", "adafactor", None), ("adamw_bnb_8bit", "adamw_8bit", None),
])
def test_optimizers_by_trls_names(optim, name, implementation):
    tables, notes = converted(**({"optim": optim} if optim else {}))
    assert tables["optim"]["name"] == name and tables["optim"].get("implementation") == implementation
    assert not any(n.startswith("optim:") for n in notes)


def test_dpo_files_become_the_dpo_objective_with_trls_defaults():
    tables, notes = converted(beta=0.2, use_peft=True)
    assert tables["hf"]["objective"] == "dpo"
    assert tables["hf"]["dpo"] == {"beta": 0.2, "loss_type": "sigmoid", "too_long": "drop"}
    assert tables["optim"]["lr"] == 1e-6 and tables["hf"]["lora"]["dropout"] == 0.0  # DPOConfig: disable_dropout
    forced, notes = trl_config.convert({"learning_rate": 1e-5}, "dpo")
    assert forced["hf"]["objective"] == "dpo" and not any("converted as a `trl sft` config" in n for n in notes)
    sft, notes = converted(learning_rate=1e-5)
    assert "hf" not in sft and any("for `trl dpo` pass --trainer dpo" in n for n in notes)
    several, notes = converted(beta=0.1, loss_type=["sigmoid", "sft"])
    assert "loss_type" not in several["hf"]["dpo"] and any(n.startswith("loss_type: ['sigmoid', 'sft'] not converted") for n in notes)


def test_a_one_dataset_mixture_is_the_training_data():
    tables, notes = converted(datasets=[{"path": "json", "data_files": "train.jsonl", "split": "train", "columns": ["a"]}])
    assert (tables["data"]["train"], tables["data"]["data_files"], tables["data"]["split"]) == ("json", ["train.jsonl"], "train")
    assert "datasets[0].columns: not converted (no trainctl equivalent)" in notes
    _, notes = converted(datasets=[{"path": "a"}, {"path": "b"}])
    assert any(n.startswith("datasets: a mixture of several datasets is not converted") for n in notes)


def test_dpo_defaults_are_trls():
    from trl import DPOConfig

    fields = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in dataclasses.fields(DPOConfig)}
    for name, value in trl_config.TRL_DPO_DEFAULTS.items():
        assert fields[name] in (value, [value]), name


def test_the_hint_table_agrees_with_the_importer():
    from trainctl.kernel.foreign_names import TRL

    for name, key in TRL.items():
        if name in trl_config.DIRECT:
            assert ".".join(trl_config.DIRECT[name]) == key, name


def one_line(proc, code=2):
    assert proc.returncode == code and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip()


def test_a_trl_yaml_given_to_run_points_to_import_trl(tmp_path):
    for name in ("sft.yaml", "sft_config"):
        source = tmp_path / name
        source.write_text("# from examples/cli_configs\nmodel_name_or_path: Qwen/Qwen2-0.5B\nlearning_rate: 2.0e-5\n")
        line = one_line(run_cli("run", str(source), "--dry-run"))
        assert f"{source} is YAML, and trainctl configs are TOML: convert a TRL config with `trainctl config import-trl {source}" in line


@pytest.mark.parametrize(("text", "hint"), [
    ("[optim]\nlearning_rate = 0.1\n", "unknown key 'optim.learning_rate' (TRL's name; trainctl's key is optim.lr)"),
    ("[train]\nper_device_train_batch_size = 2\n",
     "unknown key 'train.per_device_train_batch_size' (TRL's name; trainctl's key is train.batch_size)"),
    ("num_train_epochs = 2\n", "unknown top-level key 'num_train_epochs' (TRL's name; trainctl's key is data.epochs)"),
])
def test_trl_names_are_answered_with_trainctls(tmp_path, text, hint):
    source = tmp_path / "c.toml"
    source.write_text(text)
    assert hint in one_line(run_cli("run", str(source), "--dry-run"))
