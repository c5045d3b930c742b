"""The ``trl grpo --config`` part of :mod:`trainctl.backends.hf.trl_config`: a file that sets a key
only ``GRPOConfig`` or the ``trl grpo`` script has (or a GRPO-only loss type) becomes ``[hf]
objective = "grpo"`` with every ``[hf.grpo]`` key written out from ``GRPOConfig``'s defaults, and
``reward_funcs`` mapped where trainctl has the same reward (``think_format_reward``: the
``format`` built-in with TRL's pattern; ``reward_model_name_or_path``: the ``model`` built-in).
Torch-free.
"""

from __future__ import annotations

from typing import Any

from trainctl.backends.hf.trl_values import number, schedule

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
#: TRL's importance sampling of vLLM's samples -> [hf.grpo]'s of a stale batch's (max_staleness > 0):
#: the same ratio exp(old - sampling), its mode and bounds; written only when the file sets them
TRL_IMPORTANCE = {"vllm_importance_sampling_correction": "importance_sampling_correction",
                  "vllm_importance_sampling_mode": "importance_sampling_mode",
                  "vllm_importance_sampling_clip_max": "importance_sampling_clip_max",
                  "vllm_importance_sampling_clip_min": "importance_sampling_clip_min"}
#: Handled by :func:`convert` when the file is a GRPO config.
GRPO_SPECIAL = (*GRPO_KEYS, *TRL_IMPORTANCE, "loss_type", "beta", "disable_dropout")
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

MODEL = object()  # stands for reward_model_name_or_path among the script's reward_funcs


def convert(merged: dict[str, Any], given: dict[str, Any], put: Any, notes: list[str]) -> None:
    """``trl grpo``'s settings: the objective, the length in steps, every ``[hf.grpo]`` key, the rewards."""
    put("hf", "objective", "grpo")
    if number("max_steps", merged.get("max_steps", -1)) > 0:
        put("train", "max_steps", int(merged["max_steps"]))
    else:  # GRPOTrainer's epoch is a pass over prompts x num_generations; trainctl's GRPO counts steps
        notes.append(f"num_train_epochs: {merged['num_train_epochs']!r} not converted (objective = \"grpo\" runs "
                     "train.max_steps steps; set max_steps in the file or train.max_steps)")
    schedule(merged, given, put, notes)
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
    for key, ours in TRL_IMPORTANCE.items():
        if key not in given:
            continue
        value = given[key]
        if key == "vllm_importance_sampling_clip_min" and value is None:
            value = 0.0  # TRL's None: no lower bound
        if key == "vllm_importance_sampling_clip_max" and value is None:
            notes.append(f"{key}: null not converted (trainctl's bound is a number; set hf.grpo.{ours})")
            continue
        put("hf.grpo", ours, value)
        notes.append(f"{key}: converted to hf.grpo.{ours}, which applies to batches older than the policy "
                     "(hf.grpo.max_staleness > 0), not to vLLM's samples")
    for key in ("vllm_mode", "log_completions", "num_completions_to_print", "generation_kwargs"):
        if key in given:
            notes.append(f"{key}: not converted (no trainctl equivalent)")
    _rewards(given.get("reward_funcs"), merged["reward_weights"], given.get("reward_model_name_or_path"), put, notes)


def _rewards(funcs: Any, weights: Any, model: Any, put: Any, notes: list[str]) -> None:
    """``reward_funcs`` by the ``trl grpo`` script's names: what trainctl has the same of, and why
    not the rest; ``reward_weights`` keep the weights of the rewards kept. The script puts
    ``reward_model_name_or_path`` first among its rewards (so first in ``reward_weights``): it
    becomes the ``"model"`` built-in with ``hf.grpo.reward_model``, first too."""
    names = [funcs] if isinstance(funcs, str) else list(funcs or [])
    if model and isinstance(model, str):
        names.insert(0, MODEL)
        put("hf.grpo", "reward_model", model)
        if not model.startswith(("/", ".", "~")):
            notes.append(f"reward_model_name_or_path: {model!r} looks like a hub id; hf.grpo.reward_model loads a local "
                         f"folder only (hf download {model} --local-dir DIR, then set it to DIR)")
    weighed = isinstance(weights, list) and len(weights) == len(names)
    if weights is not None and not weighed:
        notes.append(f"reward_weights: {weights!r} not converted (TRL wants one per reward_funcs entry)")
    rewards: list[str] = []
    kept: list[Any] = []
    for i, name in enumerate(names):
        found = ("model", {}) if name is MODEL else TRL_REWARDS.get(name)
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
