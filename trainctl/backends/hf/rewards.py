"""GRPO's reward functions: built-ins by name, a third party's as ``"package.module:function"``.

A reward is a plain function ``(prompts, completions, rows) -> list[float]``: the prompts (each
repeated ``num_generations`` times, as TRL passes them), the decoded completions and the dataset
rows they came from, one float per completion. Each is handed to TRL's ``GRPOTrainer`` wrapped as
a TRL reward function (``f(prompts, completions, **columns)``), so TRL weighs them by
``reward_weights``, logs ``rewards/<name>/mean`` and computes the advantages. The wrapper checks
every answer: an exception, a NaN or a wrong length is one line naming the reward (exit 2).

Names resolve before the model loads: an unknown built-in, a module that does not import or a
missing attribute is one line too. A function is imported with importlib, never ``exec``-ed.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from trainctl.kernel.errors import ConfigError

Reward = Callable[[list[Any], list[Any], list[dict[str, Any]]], Sequence[float]]
BUILTIN = ("format", "exact_match")


def text(value: Any) -> str:
    """A completion as text: a conversational completion is its last message's content."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def format_reward(pattern: str) -> Reward:
    """1.0 when the whole completion matches ``pattern`` (``re.fullmatch``, DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def format(prompts: list[Any], completions: list[Any], rows: list[dict[str, Any]]) -> list[float]:
        return [1.0 if compiled.fullmatch(text(c)) else 0.0 for c in completions]

    return format


def exact_match_reward(column: str) -> Reward:
    """1.0 when the completion, stripped, equals the row's ``column``, stripped, else 0.0."""

    def exact_match(prompts: list[Any], completions: list[Any], rows: list[dict[str, Any]]) -> list[float]:
        return [1.0 if text(c).strip() == str(row[column]).strip() else 0.0 for c, row in zip(completions, rows)]

    return exact_match


def resolve(name: str, *, format_pattern: str, answer_column: str, columns: Sequence[str]) -> Reward:
    """The function ``hf.grpo.rewards`` names; ConfigError (one line) when it cannot be had."""
    if name == "format":
        if not format_pattern:
            raise ConfigError('hf.grpo.rewards has "format" but hf.grpo.format_pattern is empty; set the regular '
                              'expression a well-formed completion matches, e.g. format_pattern = "<answer>.*</answer>"')
        try:
            return format_reward(format_pattern)
        except re.error as exc:
            raise ConfigError(f"hf.grpo.format_pattern {format_pattern!r} is not a regular expression ({exc}); fix it") from None
    if name == "exact_match":
        if answer_column not in columns:
            raise ConfigError(f'hf.grpo.rewards has "exact_match" but the data has no column {answer_column!r} '
                              f"(columns: {', '.join(columns)}); set hf.grpo.answer_column")
        return exact_match_reward(answer_column)
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"hf.grpo.rewards: unknown reward {name!r}; use a built-in ({', '.join(BUILTIN)}) or "
                          '"package.module:function"')
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (any import failure is the config's problem, one line)
        raise ConfigError(f"hf.grpo.rewards: reward {name!r}: cannot import {module_name} "
                          f"({type(exc).__name__}: {exc}); install it or fix the name") from None
    found = getattr(module, attr, None)
    if not callable(found):
        raise ConfigError(f"hf.grpo.rewards: reward {name!r}: {module_name} has no function {attr!r}; fix the name")
    return found


def for_trl(name: str, reward: Reward) -> Callable[..., list[float]]:
    """``reward`` as a TRL reward function: the dataset columns TRL passes as keyword lists are
    put back into rows, and the answer is checked. TRL names its metrics after ``__name__``."""

    def scored(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        keys = [k for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)]
        rows = [{k: columns[k][i] for k in keys} for i in range(len(completions))]
        try:
            values = list(reward(prompts, completions, rows))
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001  (the reward's own fault: name it, one line)
            raise ConfigError(f"reward {name!r} raised {type(exc).__name__}: {exc}; fix the function") from None
        if len(values) != len(completions):
            raise ConfigError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions; "
                              "it must return one float per completion")
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(f"reward {name!r} returned a value that is not a number; return floats") from None
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"reward {name!r} returned a NaN or infinite value; return finite floats")
        return values

    scored.__name__ = name
    return scored
