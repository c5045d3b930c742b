"""Converting a ``trl sft --config``, ``trl dpo --config`` or ``trl grpo --config`` YAML file to a
trainctl TOML config for the hf backend. Torch-free.

The file is read with ``yaml.safe_load`` (plain mappings, lists and scalars: no tags, nothing
constructed or executed), at most 256 KiB of it, and what it holds is checked for depth and
alias expansion before anything converts it (:mod:`trainctl.kernel.config_import`). Its keys
are ``SFTConfig``'s (with ``TrainingArguments``'), the ``trl sft`` script's (``dataset_name``,
``dataset_train_split`` ...) and ``ModelConfig``'s (``model_name_or_path``, ``use_peft``,
``lora_r`` ...). Keys the file does not set take TRL's defaults where trainctl's differ, so the
result trains what ``trl sft`` (or ``trl dpo``) would have trained: the same tokens trained on
(``data.mask = "trl"``: SFTConfig's masking for the data's shape), the same rows in the same order
(the Trainer's seeded sampler, ``data.order = "trl"``), the same learning rate at every step
(transformers' schedule by name), the same epochs with TRL's short last step per epoch, the
script's evaluation split (``dataset_test_split``) and the Trainer's eval loss (the mean of batch
means over the whole split). What cannot be converted is listed, one line per key.

A ``trl grpo`` file (one that sets a key only ``GRPOConfig`` or the ``trl grpo`` script has, or
a GRPO-only loss type) becomes ``[hf] objective = "grpo"`` with every ``[hf.grpo]`` key written
out from ``GRPOConfig``'s defaults, and ``reward_funcs`` mapped where trainctl has the same
reward (``think_format_reward``: the ``format`` built-in with TRL's pattern).
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
    "save_total_limit": ("plugin.checkpoint", "keep_last"),
    "load_best_model_at_end": ("plugin.checkpoint", "save_best"),
    "per_device_eval_batch_size": ("train", "eval_batch_size"),
    "data_seed": ("data", "order_seed"),
    "neftune_noise_alpha": ("hf", "neftune_noise_alpha"),
    "lora_r": ("hf.lora", "r"),
    "lora_alpha": ("hf.lora", "alpha"),
    "lora_dropout": ("hf.lora", "dropout"),
}
#: Handled by :func:`convert` itself: they map to more than one key or depend on others.
SPECIAL = ("seed", "max_steps", "num_train_epochs", "lr_scheduler_type", "warmup_steps", "packing", "packing_strategy",
           "assistant_only_loss", "completion_only_loss", "bf16", "fp16", "dtype", "torch_dtype", "use_cpu", "optim",
           "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "dataset_test_split",
           "use_peft", "lora_target_modules", "train_sampling_strategy", "warmup_ratio", "datasets",
           "beta", "loss_type", "label_smoothing", "precompute_ref_log_probs", "disable_dropout",
           "eval_delay")
#: Settings that need nothing here (trainctl does it its own way); reported only if set.
IGNORED = {
    "report_to": "enable the wandb / jsonl / prometheus plugins instead",
    "logging_dir": "every log lands in the run directory",
    "push_to_hub": "not done by trainctl; push a checkpoint directory with `hf upload`",
    "hub_model_id": "not done by trainctl",
    "trust_remote_code": "trainctl never runs remote code",
    "dataloader_num_workers": "batches are collated in the training process",
    "shuffle_dataset": "data.shuffle shuffles every epoch",
    "resume_from_checkpoint": "trainctl run resumes the newest checkpoint of its out dir by itself (--resume auto); "
                              "--resume PATH names another",
    "metric_for_best_model": "save_best keeps the checkpoint of the lowest val loss",
    "dataset_streaming": "trainctl reads the whole split",
}
#: TRL's defaults (SFTConfig / ModelConfig) where trainctl's differ; tests check them against TRL.
TRL_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-5, "num_train_epochs": 3.0, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
    "adam_beta2": 0.999, "weight_decay": 0.0, "max_length": 1024, "lr_scheduler_type": "linear", "warmup_steps": 0,
    "logging_steps": 10, "output_dir": "trainer_output", "seed": 42, "gradient_checkpointing": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
    "per_device_eval_batch_size": 8, "dataset_train_split": "train", "dataset_test_split": "test",
    "bf16": True,  # SFTConfig / DPOConfig: bf16 (autocast, on a CPU too) unless fp16 is set
}
#: Where ``DPOConfig``'s defaults differ from ``SFTConfig``'s (``trl dpo``); tests check them against TRL.
TRL_DPO_DEFAULTS: dict[str, Any] = {"learning_rate": 1e-6, "beta": 0.1, "loss_type": "sigmoid", "disable_dropout": True}
#: Keys only ``DPOConfig`` has: a file holding one is a ``trl dpo`` config.
DPO_KEYS = ("beta", "label_smoothing", "precompute_ref_log_probs", "disable_dropout", "ref_model_init_kwargs",
            "rpo_alpha", "reference_free", "sync_ref_model", "use_weighting", "f_divergence_type")
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust")
#: Where ``GRPOConfig``'s defaults differ from ``SFTConfig``'s (``trl grpo``), and every key
#: ``[hf.grpo]`` takes from it; tests check them against TRL.
TRL_GRPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6, "beta": 0.0, "loss_type": "dapo", "num_generations": 8, "max_completion_length": 512,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "epsilon": 0.2, "epsilon_high": None, "num_iterations": 1,
    "scale_rewards": "group", "mask_truncated_completions": False, "importance_sampling_level": "token",
    "reward_weights": None, "steps_per_generation": None, "disable_dropout": False,
}
#: ``[hf.grpo]`` keys that are GRPOConfig's, value for value (None: ours is 0 or empty)
GRPO_DIRECT = ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon",
               "epsilon_high", "num_iterations", "mask_truncated_completions", "importance_sampling_level",
               "reward_weights", "steps_per_generation")
#: Keys only ``GRPOConfig`` (or the ``trl grpo`` script) has: a file holding one is a ``trl grpo`` config.
GRPO_KEYS = (*(k for k in GRPO_DIRECT if k != "beta"), "reward_funcs", "reward_model_name_or_path", "scale_rewards", "generation_batch_size",
             "use_vllm", "vllm_mode", "log_completions", "num_completions_to_print", "generation_kwargs")
#: Handled by :func:`_grpo` when the file is a GRPO config.
GRPO_SPECIAL = (*GRPO_KEYS, "loss_type", "beta", "disable_dropout")
#: TRL's loss types that only GRPOConfig has; trainctl runs the first four (``GRPOLossType``).
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
GRPO_RUN = GRPO_LOSSES[:4]
#: ``trl.rewards``' reward functions (the ``trl grpo`` script's names) -> (built-in, hf.grpo settings),
#: or why there is none.
TRL_REWARDS: dict[str, tuple[str, dict[str, Any]] | str] = {
    # re.match(r"^<think>(?!.*<think>)(.*?)</think>.*$", DOTALL | MULTILINE) is a full match of this
    "think_format_reward": ("format", {"format_pattern": r"<think>(?!.*<think>)(.*?)</think>.*"}),
    "accuracy_reward": "it verifies maths with math_verify (exact_match compares the stripped text with "
                       "hf.grpo.answer_column); give your own as a plugin or \"package.module:function\"",
    "reasoning_accuracy_reward": "it verifies maths after the reasoning with math_verify; give your own as a plugin "
                                 "or \"package.module:function\"",
}
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "float32": "float32",
          "fp32": "float32", "auto": "auto"}
#: TrainingArguments' optim -> (optim.name, optim.implementation)
OPTIMIZERS: dict[str, tuple[str, str]] = {
    "adamw_torch_fused": ("adamw", "fused"), "adamw_torch": ("adamw", "default"), "adamw_hf": ("adamw", "default"),
    "sgd": ("sgd", "default"), "adafactor": ("adafactor", "default"),
    "adamw_bnb_8bit": ("adamw_8bit", "default"), "adamw_8bit": ("adamw_8bit", "default"),
}


def trainer_of(values: dict[str, Any]) -> str:
    """``grpo`` when the file sets a key only ``GRPOConfig`` (or ``trl grpo``) has or a GRPO loss
    type; else ``dpo`` when it sets a key only ``DPOConfig`` has (or a DPO loss type); else ``sft``.
    GRPO first: ``beta`` is both trainers'."""
    losses = values.get("loss_type")
    losses = losses if isinstance(losses, list) else [losses]
    if any(k in values for k in GRPO_KEYS) or any(x in GRPO_LOSSES for x in losses):
        return "grpo"
    return "dpo" if any(k in values for k in DPO_KEYS) or any(x in DPO_LOSSES for x in losses) else "sft"


def convert(values: dict[str, Any], trainer: str = "auto") -> tuple[dict[str, Any], list[str]]:
    """TRL names and values -> (trainctl tables, notes on what was not converted). ``trainer``:
    ``sft``, ``dpo``, ``grpo`` or ``auto`` (:func:`trainer_of`)."""
    notes: list[str] = []
    given = dict(values)
    chosen = trainer_of(given) if trainer == "auto" else trainer
    dpo, grpo = chosen == "dpo", chosen == "grpo"
    if trainer == "auto" and chosen == "sft":
        notes.append("converted as a `trl sft` config (it sets no key only DPOConfig or GRPOConfig has); for `trl dpo` "
                     "pass --trainer dpo, for `trl grpo` --trainer grpo")
    if given.get("load_best_model_at_end"):
        notes.append("load_best_model_at_end: converted as plugin.checkpoint.save_best (the best checkpoint is kept; "
                     "the run ends with the last step's weights)")
    lora = bool(given.get("use_peft"))
    defaults = TRL_DEFAULTS | (TRL_DPO_DEFAULTS if dpo else {})
    if grpo:  # GRPOConfig has no max_length: a prompt is as long as it is, a completion max_completion_length
        defaults = {k: v for k, v in defaults.items() if k != "max_length"} | TRL_GRPO_DEFAULTS
    merged = {k: v for k, v in defaults.items() if lora or not k.startswith("lora_")} | given
    tables: dict[str, Any] = {"seed": merged["seed"], "backend": "hf"}
    special = SPECIAL + GRPO_SPECIAL if grpo else SPECIAL

    put = functools.partial(put_key, tables)

    for name, value in merged.items():
        if name in DIRECT:
            if DIRECT[name][0] == "hf.lora" and not lora:
                notes.append(f"{name}: not converted (use_peft is not true)")
            elif value is not None:
                put(*DIRECT[name], value)
        elif name in IGNORED:
            notes.append(f"{name}: not converted ({IGNORED[name]})")
        elif name not in special:
            notes.append(f"{name}: not converted (no trainctl equivalent)")

    if grpo:
        _grpo(merged, given, put, notes)
    else:
        _length(merged, given, put, notes)
    if not (dpo or grpo):  # DPO scores the completions of its pairs, unpacked; GRPO its own: nothing to choose
        _tokens(merged, put)
    _precision(merged, given, put, notes)
    _data(merged, put, notes)
    _optimizer(given, put, notes)
    # cadence: steps or epochs; TRL's ratios (< 1) have no step count to copy
    _cadence(merged, put, notes, evaluate=not grpo)
    if lora:
        targets = merged.get("lora_target_modules")
        put("hf.lora", "target_modules", list(targets) if isinstance(targets, list) else [targets or "all-linear"])
        if not targets:
            notes.append("lora_target_modules: not set; peft's per-model default became all-linear (set hf.lora.target_modules)")
    if dpo:
        _dpo(merged, lora, put, notes)
    return _ordered(tables), notes


def _length(merged: dict[str, Any], given: dict[str, Any], put: Any, notes: list[str]) -> None:
    """The run's length (max_steps > 0 wins over epochs, as in TrainingArguments) and its schedule."""
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
    if "warmup_ratio" in given and not given.get("warmup_steps"):
        warmup = _number("warmup_ratio", given["warmup_ratio"])
        notes.append(f"warmup_ratio: transformers 5 removed it and `trl sft` refuses it; converted as "
                     f"plugin.lr.warmup_ratio = {warmup:g} (in a TRL file write warmup_steps: {warmup:g})")
    if isinstance(warmup, float) and 0 < warmup < 1:
        put("plugin.lr", "warmup_ratio", warmup)
        put("plugin.lr", "warmup_steps", 0)
    else:
        put("plugin.lr", "warmup_steps", int(warmup))


def _tokens(merged: dict[str, Any], put: Any) -> None:
    """Packing and the loss mask: SFTConfig's defaults train every token of a conversation and the
    completion of a prompt/completion row (``data.mask = "trl"`` resolves them by the data's shape)."""
    put("data", "packing", (merged.get("packing_strategy") or "bfd") if merged.get("packing") else False)
    if merged.get("assistant_only_loss"):
        put("data", "mask", "assistant_only")
    elif merged.get("completion_only_loss") is False:
        put("data", "mask", "none")
    else:
        put("data", "mask", "trl")


def _precision(merged: dict[str, Any], given: dict[str, Any], put: Any, notes: list[str]) -> None:
    if merged.get("fp16"):
        put("train", "dtype", "float16")
    elif merged.get("bf16") or merged.get("bf16") is None:  # None: TRL's default, bf16 unless fp16
        put("train", "dtype", "bfloat16")
    else:
        put("train", "dtype", "float32")
    for key in ("dtype", "torch_dtype"):
        if key in given:
            if str(given[key]) in DTYPES:
                put("model", "dtype", DTYPES[str(given[key])])
            else:
                notes.append(f"{key}: {given[key]!r} not converted (use auto, float32, bfloat16 or float16)")
    if merged.get("use_cpu"):
        put("train", "device", "cpu")


def _data(merged: dict[str, Any], put: Any, notes: list[str]) -> None:
    """The order of the rows: the Trainer's seeded sampler, or file order; a one-entry
    ``datasets:`` mixture as data.train."""
    sampling = merged.get("train_sampling_strategy", "random")
    if sampling in ("random", "sequential"):
        put("data", "shuffle", sampling == "random")
        put("data", "order", "trl")  # accelerate's SeedableRandomSampler: randperm seeded with data_seed + epoch
    else:
        notes.append(f"train_sampling_strategy: {sampling!r} not converted (data.shuffle: the Trainer's random order or file order)")
    mixture = merged.get("datasets")
    if mixture is None:
        return
    entries = mixture if isinstance(mixture, list) else [mixture]
    if len(entries) != 1 or not isinstance(entries[0], dict) or not isinstance(entries[0].get("path"), str):
        notes.append("datasets: a mixture of several datasets is not converted (trainctl trains on one; set data.train)")
        return
    entry = entries[0]
    put("data", "train", entry["path"])
    if isinstance(entry.get("name"), str):
        put("data", "subset", entry["name"])
    if isinstance(entry.get("split"), str):
        put("data", "split", entry["split"])
    files = entry.get("data_files")
    if isinstance(files, (str, list)):
        put("data", "data_files", [files] if isinstance(files, str) else [str(f) for f in files])
    for key in sorted(set(entry) - {"path", "name", "split", "data_files"}):
        notes.append(f"datasets[0].{key}: not converted (no trainctl equivalent)")


def _optimizer(given: dict[str, Any], put: Any, notes: list[str]) -> None:
    optim = given.get("optim", "adamw_torch_fused")  # TrainingArguments' default with torch >= 2.8
    if optim in OPTIMIZERS:
        name, implementation = OPTIMIZERS[optim]
        put("optim", "name", name)
        if name == "adamw":
            put("optim", "implementation", implementation)
    else:
        notes.append(f"optim: {optim!r} not converted (trainctl runs {', '.join(sorted(OPTIMIZERS))})")


def _dpo(merged: dict[str, Any], lora: bool, put: Any, notes: list[str]) -> None:
    """``trl dpo``'s settings: the objective, its loss, the reference, and TRL's handling of rows."""
    put("hf", "objective", "dpo")
    put("hf.dpo", "beta", merged["beta"])
    losses = merged["loss_type"] if isinstance(merged["loss_type"], list) else [merged["loss_type"]]
    if len(losses) == 1 and losses[0] in DPO_LOSSES:
        put("hf.dpo", "loss_type", losses[0])
    else:
        notes.append(f"loss_type: {merged['loss_type']!r} not converted (trainctl computes one of {', '.join(DPO_LOSSES)})")
    if merged.get("label_smoothing"):
        put("hf.dpo", "label_smoothing", merged["label_smoothing"])
    if merged.get("precompute_ref_log_probs"):
        put("hf.dpo", "reference", "precomputed")
    put("hf.dpo", "too_long", "drop")  # DPOTrainer drops pairs whose prompt fills max_length
    if merged.get("disable_dropout") and lora:
        put("hf.lora", "dropout", 0.0)  # DPOTrainer sets every dropout to 0, the adapter's too
    elif not merged.get("disable_dropout"):
        notes.append("disable_dropout: false not converted (trainctl's DPO keeps the model's dropout as configured)")


def _grpo(merged: dict[str, Any], given: dict[str, Any], put: Any, notes: list[str]) -> None:
    """``trl grpo``'s settings: the objective, the length in steps, every ``[hf.grpo]`` key, the rewards."""
    put("hf", "objective", "grpo")
    if _number("max_steps", merged.get("max_steps", -1)) > 0:
        put("train", "max_steps", int(merged["max_steps"]))
    else:  # GRPOTrainer's epoch is a pass over prompts x num_generations; trainctl's GRPO counts steps
        notes.append(f"num_train_epochs: {merged['num_train_epochs']!r} not converted (objective = \"grpo\" runs "
                     "train.max_steps steps; set max_steps in the file or train.max_steps)")
    put("plugin.lr", "family", "transformers")
    put("plugin.lr", "schedule", merged["lr_scheduler_type"])
    warmup = _number("warmup_steps", merged["warmup_steps"])
    if isinstance(warmup, float) and 0 < warmup < 1:
        put("plugin.lr", "warmup_ratio", warmup)
        put("plugin.lr", "warmup_steps", 0)
    else:
        put("plugin.lr", "warmup_steps", int(warmup))
    for key in GRPO_DIRECT:
        if key == "reward_weights":
            continue  # with the rewards, which may lose some: _rewards
        value = merged[key]
        put("hf.grpo", key, (0 if key in ("epsilon_high", "steps_per_generation") else []) if value is None else value)
    losses = merged["loss_type"] if isinstance(merged["loss_type"], list) else [merged["loss_type"]]
    if len(losses) == 1 and losses[0] in GRPO_RUN:
        put("hf.grpo", "loss_type", losses[0])
    else:
        notes.append(f"loss_type: {merged['loss_type']!r} not converted (trainctl runs {', '.join(GRPO_RUN)})")
    scale = merged["scale_rewards"]
    put("hf.grpo", "scale_rewards", {True: "group", False: "none"}.get(scale, scale) if isinstance(scale, bool) else scale)
    batch = merged.get("generation_batch_size")
    if batch is not None:
        per_step = merged["per_device_train_batch_size"]
        if isinstance(batch, int) and isinstance(per_step, int) and per_step > 0 and batch % per_step == 0:
            put("hf.grpo", "steps_per_generation", batch // per_step)  # GRPOConfig's own derivation, one process
        else:
            notes.append(f"generation_batch_size: {batch!r} not converted (not a multiple of per_device_train_batch_size "
                         f"{per_step!r}; set hf.grpo.steps_per_generation)")
    if merged.get("disable_dropout"):
        notes.append("disable_dropout: true not converted (trainctl's GRPO keeps the model's dropout as configured)")
    if given.get("use_vllm"):
        notes.append("use_vllm: not converted (trainctl generates with transformers' generate in the training process, "
                     "as GRPOTrainer(use_vllm=False); vLLM is not supported yet)")
    for key in ("vllm_mode", "log_completions", "num_completions_to_print", "generation_kwargs"):
        if key in given:
            notes.append(f"{key}: not converted (no trainctl equivalent)")
    if given.get("reward_model_name_or_path"):
        notes.append(f"reward_model_name_or_path: {given['reward_model_name_or_path']!r} not converted (trainctl scores with "
                     "reward functions only; wrap a reward model in a trainctl_reward plugin)")
    _rewards(given.get("reward_funcs"), merged["reward_weights"], put, notes)


def _rewards(funcs: Any, weights: Any, put: Any, notes: list[str]) -> None:
    """``reward_funcs`` by the ``trl grpo`` script's names: what trainctl has the same of, and why
    not the rest; ``reward_weights`` keep the weights of the rewards kept."""
    names = [funcs] if isinstance(funcs, str) else list(funcs or [])
    weighed = isinstance(weights, list) and len(weights) == len(names)
    if weights is not None and not weighed:
        notes.append(f"reward_weights: {weights!r} not converted (TRL wants one per reward_funcs entry)")
    rewards: list[str] = []
    kept: list[Any] = []
    for i, name in enumerate(names):
        found = TRL_REWARDS.get(name)
        if isinstance(found, tuple):
            rewards.append(found[0])
            kept.append(weights[i] if weighed else None)
            for key, value in found[1].items():
                put("hf.grpo", key, value)
        elif isinstance(found, str):
            notes.append(f"reward_funcs: {name!r} not converted ({found})")
        elif isinstance(name, str) and "." in name:  # the script's dotted import path: f(completions, **columns)
            module, _, function = name.rpartition(".")
            notes.append(f"reward_funcs: {name!r} not converted (trainctl calls a reward as f(prompts, completions, rows); "
                         f"once it takes those, name it \"{module}:{function}\" in hf.grpo.rewards)")
        else:
            notes.append(f"reward_funcs: {name!r} not converted (not one of trl grpo's: {', '.join(TRL_REWARDS)})")
    put("hf.grpo", "rewards", rewards)
    put("hf.grpo", "reward_weights", kept if weighed else [])
    if not rewards:
        notes.append("hf.grpo.rewards: empty, and the run refuses that; name a built-in (format, exact_match), a "
                     "reward plugin or \"package.module:function\"")


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


def _cadence(merged: dict[str, Any], put: Any, notes: list[str], *, evaluate: bool = True) -> None:
    logging = merged["logging_steps"]
    if isinstance(logging, int) and logging >= 1:
        put("train", "log_interval", logging)
    else:
        notes.append(f"logging_steps: {logging!r} not converted (a ratio; set train.log_interval)")
    if evaluate:
        _evaluation(merged, put, notes)
    else:  # GRPO scores no fixed split: its rewards are reported every step
        put("data", "val_fraction", 0.0)
        put("train", "eval_interval", 0)
        if merged.get("eval_strategy", "no") != "no":
            notes.append(f"eval_strategy: {merged['eval_strategy']!r} not converted (objective = \"grpo\" evaluates "
                         "nothing; its rewards are logged every step)")
    strategy, every = merged.get("save_strategy", "steps"), merged.get("save_steps", 500)
    if strategy == "steps" and isinstance(every, int) and not isinstance(every, bool):
        put("train", "save_interval", every)
    elif strategy == "steps":  # TRL's ratio of the run (0.5), which has no step count to copy
        notes.append(f"save_steps: {every!r} not converted (a ratio; set train.save_interval)")
    elif strategy == "epoch":  # DefaultFlowCallback.on_epoch_end: after each epoch's last step
        put("train", "save_strategy", "epoch")
    else:
        notes.append(f"save_strategy: {strategy!r} not converted (trainctl saves every "
                     "train.save_interval steps and at the end)")


def _evaluation(merged: dict[str, Any], put: Any, notes: list[str]) -> None:
    """What ``trl sft`` evaluates: ``dataset[dataset_test_split]`` of the same dataset when
    ``eval_strategy`` is not ``no`` (every row of it, in order, in batches of
    ``per_device_eval_batch_size``, the loss the mean of the batches' means), else nothing."""
    strategy = merged.get("eval_strategy", "no")
    train = merged.get("dataset_name")
    mixture = merged.get("datasets")
    if strategy == "no" or not (train or mixture):
        put("data", "val_fraction", 0.0)  # TRL holds no rows out
        return
    if mixture is not None:
        put("data", "val_fraction", 0.0)
        notes.append("eval_strategy: not converted for a `datasets:` mixture (TRL splits it by test_split_size); set data.val")
        return
    split = merged["dataset_test_split"]
    if str(train).lower().endswith(FILE_SUFFIXES):  # load_dataset of one file has a train split only
        put("data", "val_fraction", 0.0)
        notes.append(f"dataset_test_split: {train} is one file, whose only split is 'train' (`trl sft` fails on "
                     f"dataset[{split!r}]); nothing is evaluated: set data.val to a validation file")
        return
    put("data", "val", train)
    put("data", "val_split", split)
    put("train", "eval_loss", "batches")  # Trainer's eval_loss: the mean of each batch's token mean
    put("train", "eval_steps", 0)  # Trainer evaluates the whole split
    if strategy == "steps":
        every = merged.get("eval_steps") or merged["logging_steps"]  # TrainingArguments' fallback
        if isinstance(every, int) and not isinstance(every, bool) and every >= 1:
            put("train", "eval_interval", every)
        else:
            notes.append(f"eval_steps: {every!r} not converted (a ratio; set train.eval_interval)")
    elif strategy == "epoch":  # DefaultFlowCallback.on_epoch_end: after each epoch's last step
        put("train", "eval_strategy", "epoch")
    else:
        notes.append(f"eval_strategy: {strategy!r} not converted (trainctl evaluates every "
                     "train.eval_interval steps or epoch, and at the end)")
    if merged.get("eval_delay"):
        notes.append(f"eval_delay: {merged['eval_delay']!r} not converted (trainctl evaluates from the first "
                     "interval or epoch on)")


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def _ordered(tables: dict[str, Any]) -> dict[str, Any]:
    order = ["seed", "backend", "train", "optim", "model", "data", "hf", "plugin"]
    return {k: tables[k] for k in order if k in tables}


def import_file(path: Path, trainer: str = "auto") -> tuple[dict[str, Any], list[str]]:
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
    return convert(values, trainer)
