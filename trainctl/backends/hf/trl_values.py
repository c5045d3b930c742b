"""Values of a TRL config file as the converters carry them (:mod:`trainctl.backends.hf.trl_config`,
:mod:`trainctl.backends.hf.trl_grpo_config`): numbers checked finite, and transformers' learning-
rate schedule by name with its warmup. Torch-free.
"""

from __future__ import annotations

import math
from typing import Any

from trainctl.kernel.errors import ConfigError


def number(name: str, value: Any) -> int | float:
    """``value`` if it is a finite number (``.inf`` would reach int() and overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite(value):
        raise ConfigError(f"{name}: expected a number, got {value!r}; fix the trl config")
    return value


def finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float: no step count or epoch count either
        return False


def schedule(merged: dict[str, Any], given: dict[str, Any], put: Any, notes: list[str]) -> None:
    """The schedule: transformers' own, by its name; warmup_steps < 1 is a ratio (TrainingArguments)."""
    put("plugin.lr", "family", "transformers")
    put("plugin.lr", "schedule", merged["lr_scheduler_type"])
    warmup = number("warmup_steps", merged["warmup_steps"])
    if "warmup_ratio" in given and not given.get("warmup_steps"):
        warmup = number("warmup_ratio", given["warmup_ratio"])
        notes.append(f"warmup_ratio: transformers 5 removed it and `trl sft` refuses it; converted as "
                     f"plugin.lr.warmup_ratio = {warmup:g} (in a TRL file write warmup_steps: {warmup:g})")
    if isinstance(warmup, float) and 0 < warmup < 1:
        put("plugin.lr", "warmup_ratio", warmup)
        put("plugin.lr", "warmup_steps", 0)
    else:
        put("plugin.lr", "warmup_steps", int(warmup))
