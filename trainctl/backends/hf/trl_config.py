"""Converting a ``trl sft --config`` YAML file to a trainctl TOML config for the hf backend.
Torch-free.

The file is read with ``yaml.safe_load`` (plain mappings, lists and scalars: no tags, nothing
constructed or executed), at most 256 KiB of it, and what it holds is checked for depth and
alias expansion before anything converts it (:mod:`trainctl.kernel.config_import`). Its keys
are ``SFTConfig``'s (with ``TrainingArguments``'), the ``trl sft`` script's (``dataset_name``,
``dataset_train_split`` ...) and ``ModelConfig``'s (``model_name_or_path``, ``use_peft``,
``lora_r`` ...). Keys the file does not set take TRL's defaults where trainctl's differ, so the
result trains what ``trl sft`` would have trained: the same learning rate at every step
(transformers' schedule by name), the same epochs with TRL's short last step per epoch, no rows
held out unless TRL would evaluate. What cannot be converted is listed, one line per key.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from trainctl.kernel.config import put_key
from trainctl.kernel.config_import import check_values, read_source
from trainctl.kernel.errors import ConfigError

WHAT = "trl config"

#: TRL name -> (our table path, key): values that carry over as they are.
DIRECT: dict[str, tuple[str, str]] = {
    "model_name_or_path": ("model", "name_or_path"),
    "model_revision": ("model", "revision"),
    "attn_implementation": ("model", "attn_implementation"),
    "gradient_checkpointing": ("model", "gradient_checkpointing"),
    "max_length": ("model", "max_length"),
    "max_seq_length": ("model", "max_length"),  # TRL's older name
    "chat_template_path": ("model", "chat_template"),
    "dataset_name": ("data", "train"),
    "dataset_config": ("data", "subset"),
    "dataset_train_split": ("data", "split"),
    "dataset_text_field": ("data", "text_field"),
    "eos_token": ("data", "eos_token"),
    "per_device_train_batch_size": ("train", "batch_size"),
    "gradient_accumulation_steps": ("train", "grad_accum"),
    "max_grad_norm": ("train", "grad_clip"),
    "output_dir": ("train", "out_dir"),
    "run_name": ("train", "run_name"),
    "learning_rate": ("optim", "lr"),
    "weight_decay": ("optim", "weight_decay"),
    "adam_beta1": ("optim", "beta1"),
    "adam_beta2": ("optim", "beta2"),
    "adam_epsilon": ("optim", "eps"),
    "lr_scheduler_kwargs": ("plugin.lr", "hf_kwargs"),
    "warmup_ratio": ("plugin.lr", "warmup_ratio"),
    "save_total_limit": ("plugin.checkpoint", "keep_last"),
    "lora_r": ("hf.lora", "r"),
    "lora_alpha": ("hf.lora", "alpha"),
    "lora_dropout": ("hf.lora", "dropout"),
}
#: Handled by :func:`convert` itself: they map to more than one key or depend on others.
SPECIAL = ("seed", "max_steps", "num_train_epochs", "lr_scheduler_type", "warmup_steps", "packing", "packing_strategy",
           "assistant_only_loss", "completion_only_loss", "bf16", "fp16", "dtype", "torch_dtype", "use_cpu", "optim",
           "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "dataset_test_split",
           "use_peft", "lora_target_modules", "train_sampling_strategy")
#: Settings that need nothing here (trainctl does it its own way); reported only if set.
IGNORED = {
    "report_to": "enable the wandb / jsonl / prometheus plugins instead",
    "logging_dir": "every log lands in the run directory",
    "push_to_hub": "not done by trainctl; push a checkpoint directory with `hf upload`",
    "hub_model_id": "not done by trainctl",
    "trust_remote_code": "trainctl never runs remote code",
    "dataloader_num_workers": "batches are collated in the training process",
    "shuffle_dataset": "data.shuffle shuffles every epoch",
    "per_device_eval_batch_size": "evaluation batches are train.batch_size rows",
}
#: TRL's defaults (SFTConfig / ModelConfig) where trainctl's differ; tests check them against TRL.
TRL_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-5, "num_train_epochs": 3.0, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
    "adam_beta2": 0.999, "weight_decay": 0.0, "max_length": 1024, "lr_scheduler_type": "linear", "warmup_steps": 0,
    "logging_steps": 10, "output_dir": "trainer_output", "seed": 42, "gradient_checkpointing": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
}
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "float32": "float32",
          "fp32": "float32", "auto": "auto"}
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")


def convert(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """TRL names and values -> (trainctl tables, notes on what was not converted)."""
    notes: list[str] = []
    given = dict(values)
    lora = bool(given.get("use_peft"))
    merged = {k: v for k, v in TRL_DEFAULTS.items() if lora or not k.startswith("lora_")} | given
    tables: dict[str, Any] = {"seed": merged["seed"], "backend": "hf"}

    put = functools.partial(put_key, tables)

    for name, value in merged.items():
        if name in DIRECT:
            if DIRECT[name][0] == "hf.lora" and not lora:
                notes.append(f"{name}: not converted (use_peft is not true)")
            elif value is not None:
                put(*DIRECT[name], value)
        elif name in IGNORED:
            notes.append(f"{name}: not converted ({IGNORED[name]})")
        elif name not in SPECIAL:
            notes.append(f"{name}: not converted (no trainctl equivalent)")

    # length: max_steps > 0 wins over epochs, as in TrainingArguments
    if _number("max_steps", merged.get("max_steps", -1)) > 0:
        put("train", "max_steps", int(merged["max_steps"]))
        put("data", "epochs", 0.0)
    else:
        put("data", "epochs", float(_number("num_train_epochs", merged["num_train_epochs"])))
    put("data", "epoch_end", "short_step")  # Trainer's last step of an epoch takes what is left
    # the schedule: transformers' own, by its name; warmup_steps < 1 is a ratio (TrainingArguments)
    put("plugin.lr", "family", "transformers")
    put("plugin.lr", "schedule", merged["lr_scheduler_type"])
    warmup = _number("warmup_steps", merged["warmup_steps"])
    if isinstance(warmup, float) and 0 < warmup < 1:
        put("plugin.lr", "warmup_ratio", warmup)
        put("plugin.lr", "warmup_steps", 0)
    else:
        put("plugin.lr", "warmup_steps", int(warmup))
    # packing and the loss mask
    if merged.get("packing"):
        put("data", "packing", merged.get("packing_strategy") or "bfd")
    else:
        put("data", "packing", False)
    if merged.get("assistant_only_loss"):
        put("data", "mask", "assistant_only")
    elif merged.get("completion_only_loss") is False:
        put("data", "mask", "none")
    # precision and device
    if merged.get("bf16"):
        put("train", "dtype", "bfloat16")
    elif merged.get("fp16"):
        put("train", "dtype", "float16")
    for key in ("dtype", "torch_dtype"):
        if key in given:
            if str(given[key]) in DTYPES:
                put("model", "dtype", DTYPES[str(given[key])])
            else:
                notes.append(f"{key}: {given[key]!r} not converted (use auto, float32, bfloat16 or float16)")
    sampling = merged.get("train_sampling_strategy", "random")
    if sampling in ("random", "sequential"):
        put("data", "shuffle", sampling == "random")  # a seeded order every epoch (not Trainer's), or file order
    else:
        notes.append(f"train_sampling_strategy: {sampling!r} not converted (data.shuffle: a seeded order or file order)")
    if merged.get("use_cpu"):
        put("train", "device", "cpu")
    if "optim" in given and given["optim"] not in OPTIMIZERS:
        notes.append(f"optim: {given['optim']!r} not converted (trainctl runs torch AdamW, or optim.name = muon)")
    # cadence: steps only; TRL's ratios (< 1) and epoch strategies have no step count to copy
    _cadence(merged, put, notes)
    if lora:
        targets = merged.get("lora_target_modules")
        put("hf.lora", "target_modules", list(targets) if isinstance(targets, list) else [targets or "all-linear"])
        if not targets:
            notes.append("lora_target_modules: not set; peft's per-model default became all-linear (set hf.lora.target_modules)")
    return _ordered(tables), notes


def _number(name: str, value: Any) -> int | float:
    """``value`` if it is a finite number (``.inf`` would reach int() and overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ConfigError(f"{name}: expected a number, got {value!r}; fix the trl config")
    return value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float: no step count or epoch count either
        return False


def _cadence(merged: dict[str, Any], put: Any, notes: list[str]) -> None:
    logging = merged["logging_steps"]
    if isinstance(logging, int) and logging >= 1:
        put("train", "log_interval", logging)
    else:
        notes.append(f"logging_steps: {logging!r} not converted (a ratio; set train.log_interval)")
    evaluating = merged.get("eval_strategy", "no") != "no"
    if evaluating and merged.get("dataset_test_split") and merged.get("dataset_name"):
        put("data", "val", merged["dataset_name"])
        put("data", "val_split", merged["dataset_test_split"])
    else:
        put("data", "val_fraction", 0.0)  # TRL holds no rows out
    if merged.get("eval_strategy") == "steps" and isinstance(merged.get("eval_steps"), int):
        put("train", "eval_interval", merged["eval_steps"])
    elif evaluating:
        notes.append(f"eval_strategy: {merged['eval_strategy']!r} not converted (trainctl evaluates every "
                     "train.eval_interval steps and at the end)")
    strategy, every = merged.get("save_strategy", "steps"), merged.get("save_steps", 500)
    if strategy == "steps" and isinstance(every, int) and not isinstance(every, bool):
        put("train", "save_interval", every)
    elif strategy == "steps":  # TRL's ratio of the run (0.5), which has no step count to copy
        notes.append(f"save_steps: {every!r} not converted (a ratio; set train.save_interval)")
    else:
        notes.append(f"save_strategy: {strategy!r} not converted (trainctl saves every "
                     "train.save_interval steps and at the end)")


def _ordered(tables: dict[str, Any]) -> dict[str, Any]:
    order = ["seed", "backend", "train", "optim", "model", "data", "hf", "plugin"]
    return {k: tables[k] for k in order if k in tables}


def import_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Read (bounded: :mod:`trainctl.kernel.config_import`), parse with ``yaml.safe_load``, convert.
    Whatever the file holds, a problem is a one-line ConfigError."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("config import-trl reads YAML: pip install 'trainctl[hf]' (PyYAML)") from None
    text = read_source(path, WHAT)
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except (RecursionError, MemoryError):  # [[[[... nested thousands deep
        raise ConfigError(f"{path}: YAML nested too deep to read; a {WHAT} holds plain settings: fix the file") from None
    except Exception as exc:  # a constructor's own error, e.g. ValueError for an int of 5000 digits
        raise ConfigError(f"{path}: not a readable {WHAT} ({type(exc).__name__}: {str(exc)[:200]})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"{path}: a trl config is a mapping of setting names to values, got {type(values).__name__}")
    check_values(values, path, WHAT)  # before repr() or the TOML writer expand an alias bomb or a cycle
    return convert(values)
