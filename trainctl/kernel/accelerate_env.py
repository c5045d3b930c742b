"""What ``accelerate launch`` asks for, as ``[train]`` keys: a run started with
``--use_fsdp --fsdp_version 2`` (or an accelerate config file with ``distributed_type: FSDP``)
trains with FSDP2 and the settings the launcher carries, or stops with one line naming what
trainctl does not do and the key to use instead. It never falls back to DDP in silence.

The launcher passes its settings to each rank as environment variables (accelerate's
``utils/launch.py``: ``ACCELERATE_USE_FSDP``, ``FSDP_*``, ``ACCELERATE_MIXED_PRECISION``).
It exports every FSDP flag, asked for or not, so a value equal to accelerate's own default
carries no request: it fills in a key the config leaves unset and yields to one the config
sets. A value that differs from accelerate's default is a request: it fills in an unset key,
and a config (file or ``--set``) that sets the same key to something else is a one-line error
(neither side wins in silence). ``ACCELERATE_USE_FSDP`` is always a request.

Pure: reads a mapping, edits the raw ``[train]`` table; never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainctl.kernel.errors import ConfigError

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
# FSDP1's names for reshard_after_forward (accelerate accepts them for --fsdp_reshard_after_forward)
RESHARD_NAMES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}
# settings that only tune FSDP1 or how accelerate's own Trainer loads a model: no effect here
NOT_APPLICABLE = ("FSDP_MIN_NUM_PARAMS", "FSDP_USE_ORIG_PARAMS", "FSDP_CPU_RAM_EFFICIENT_LOADING",
                  "FSDP_SYNC_MODULE_STATES", "FSDP_BACKWARD_PREFETCH")


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    value = env.get(name)
    if value is None:
        return None
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise ConfigError(f"accelerate launch set {name}={value!r}; expected true or false")


def _refuse(what: str, instead: str) -> ConfigError:
    return ConfigError(f"accelerate launch asks for {what}, which trainctl does not support; {instead}")


def launcher_train_keys(env: Mapping[str, str]) -> tuple[dict[str, tuple[Any, bool]], list[str]]:
    """``{train key: (value, requested)}`` from the launcher's environment, and warnings.
    ``requested``: the value differs from accelerate's default (see the module doc)."""
    keys: dict[str, tuple[Any, bool]] = {}
    warnings: list[str] = []
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        raise _refuse("DeepSpeed", "train.parallel = 'fsdp' shards parameters, gradients and optimizer state as ZeRO-3 does: "
                      "launch with --use_fsdp --fsdp_version 2")
    if _flag(env, "ACCELERATE_USE_MEGATRON_LM"):
        raise _refuse("Megatron-LM", "train.parallel = 'fsdp' or 'ddp' are the strategies trainctl has")
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision == "fp8":
        raise _refuse("fp8 mixed precision", "use --mixed_precision bf16 (train.dtype = 'bfloat16')")
    if precision in ("bf16", "fp16"):
        keys["dtype"] = ("bfloat16" if precision == "bf16" else "float16", True)
    if not _flag(env, "ACCELERATE_USE_FSDP"):
        return keys, warnings
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise _refuse(f"FSDP version {version}", "trainctl shards with FSDP2 (fully_shard): launch with --fsdp_version 2 "
                      "(fsdp_version: 2 in the accelerate config), or set train.parallel = 'fsdp' under torchrun")
    keys["parallel"] = ("fsdp", True)
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if strategy not in ("FULL_SHARD", "1"):
        raise _refuse(f"sharding strategy {strategy}", "trainctl shards fully over all ranks (FULL_SHARD); "
                      "use train.fsdp_reshard_after_forward = false for SHARD_GRAD_OP's trade-off, or train.parallel = 'ddp'")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true")
    value = RESHARD_NAMES.get(reshard.upper(), None)
    if value is None:
        value = _flag(env, "FSDP_RESHARD_AFTER_FORWARD")
        if value is None:
            raise _refuse(f"reshard_after_forward {reshard}", "use train.fsdp_reshard_after_forward = true or false")
    keys["fsdp_reshard_after_forward"] = (value, not value)
    offload = _flag(env, "FSDP_OFFLOAD_PARAMS")
    if offload is not None:
        keys["cpu_offload"] = (offload, offload)
    checkpointing = _flag(env, "FSDP_ACTIVATION_CHECKPOINTING")
    if checkpointing is not None:
        keys["activation_checkpointing"] = (checkpointing, checkpointing)
    if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD"):
        raise _refuse("activation checkpointing with offload", "drop --fsdp_activation_checkpointing_offload; "
                      "train.activation_checkpointing = true recomputes activations on the device")
    if _flag(env, "FSDP_FORWARD_PREFETCH"):
        raise _refuse("explicit forward prefetch", "drop --fsdp_forward_prefetch (FSDP2 overlaps the next block's "
                      "all-gather by itself)")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper()
    if policy != "TRANSFORMER_BASED_WRAP":
        raise _refuse(f"auto wrap policy {policy}", "trainctl wraps each transformer block, then the root "
                      "(TRANSFORMER_BASED_WRAP): drop --fsdp_auto_wrap_policy")
    if env.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        warnings.append(f"accelerate's fsdp_transformer_layer_cls_to_wrap ({env['FSDP_TRANSFORMER_CLS_TO_WRAP']}) is not "
                        "used: trainctl shards each block its model declares (gpt: its blocks; hf: _no_split_modules)")
    if env.get("FSDP_STATE_DICT_TYPE"):
        warnings.append(f"accelerate's fsdp_state_dict_type ({env['FSDP_STATE_DICT_TYPE']}) is not used: trainctl "
                        "writes its own checkpoints (see README, Distributed runs)")
    return keys, warnings


def apply(raw: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """Merge the launcher's settings into the raw ``[train]`` table (see the module doc);
    returns warnings for the settings that have no effect here."""
    keys, warnings = launcher_train_keys(env)
    if not keys:
        return warnings
    train = raw.setdefault("train", {})
    if not isinstance(train, dict):
        return warnings  # the config's own check names the problem
    for key, (value, requested) in keys.items():
        if key not in train:
            train[key] = value
        elif requested and train[key] != value:
            raise ConfigError(
                f"train.{key} = {train[key]!r} in the config, but accelerate launch asks for {value!r}; "
                f"remove one of them (the launcher's setting or train.{key})"
            )
    return warnings
