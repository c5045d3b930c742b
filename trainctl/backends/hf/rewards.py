"""GRPO's rewards: built-ins by name, an enabled plugin's (``trainctl_reward``) by its name, a
third party's function as ``"package.module:function"``.

A reward is a plain function ``(prompts, completions, rows) -> list[float]``: the prompts (each
repeated ``num_generations`` times, as TRL passes them), the decoded completions and the dataset
rows they came from, one float per completion. Each is handed to TRL's ``GRPOTrainer`` wrapped as
a TRL reward function (``f(prompts, completions, **columns)``), so TRL weighs them by
``reward_weights``, logs ``rewards/<name>/mean`` and computes the advantages. The wrapper checks
every answer: an exception, a NaN or a wrong length is one line naming the reward (exit 2).

A plugin's reward is its ``trainctl_reward`` implementation, asked alone through the bus
(``BackendContext.rewards``); it is checked the same way, and named as a plugin in the messages.

Names resolve before the model loads: an unknown name, a module that does not import or a
missing attribute is one line too. A function is imported with importlib, never ``exec``-ed;
nothing is resolved for a backend built to evaluate (:func:`not_loaded`), so ``trainctl eval``
and the eval worker import no module that a checkpoint's config names.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trainctl.kernel.errors import ConfigError

Reward = Callable[[list[Any], list[Any], list[dict[str, Any]]], Sequence[float]]
BUILTIN = ("format", "exact_match", "model")  # "model": reward_model.py, a model TRL runs itself


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


def resolve(name: str, *, format_pattern: str, answer_column: str, columns: Sequence[str],
            plugins: Mapping[str, Reward]) -> Reward:
    """The function ``hf.grpo.rewards`` names (``plugins``: the enabled reward plugins, by name);
    ConfigError (one line) when it cannot be had. A built-in's name wins over a plugin's."""
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
    if name in plugins:
        return plugins[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        enabled = ", ".join(sorted(plugins)) or "none"
        raise ConfigError(f"hf.grpo.rewards: unknown reward {name!r}; use a built-in ({', '.join(BUILTIN)}), an enabled "
                          f"plugin that implements trainctl_reward (enabled: {enabled}; add it to plugins) or "
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


def for_trl(name: str, reward: Reward, *, plugin: bool = False) -> Callable[..., list[float]]:
    """``reward`` as a TRL reward function: the dataset columns TRL passes as keyword lists are
    put back into rows, and the answer is checked (``plugin``: the messages name a plugin). TRL
    names its metrics after ``__name__``."""
    what, fix = (f"reward plugin {name!r}", "fix the plugin") if plugin else (f"reward {name!r}", "fix the function")

    def scored(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        keys = [k for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)]
        rows = [{k: columns[k][i] for k in keys} for i in range(len(completions))]
        try:
            answer = reward(prompts, completions, rows)
            values = None if answer is None else list(answer)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001  (the reward's own fault: name it, one line)
            raise ConfigError(f"{what} raised {type(exc).__name__}: {exc}; {fix}") from None
        if values is None:
            raise ConfigError(f"{what} returned nothing for {len(completions)} completions; it must return one float per completion")
        if len(values) != len(completions):
            raise ConfigError(f"{what} returned {len(values)} values for {len(completions)} completions; "
                              "it must return one float per completion")
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(f"{what} returned a value that is not a number; return floats") from None
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"{what} returned a NaN or infinite value; return finite floats")
        return values

    scored.__name__ = name
    return scored


def not_loaded(name: str) -> Callable[..., list[float]]:
    """What stands for reward ``name`` in a backend built to evaluate (``BackendContext.trains``
    false): nothing is imported for it, and it is never called (evaluation generates no rollouts)."""

    def refused(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        raise ConfigError(f"reward {name!r} is not loaded: this backend was built to evaluate, not to train")

    refused.__name__ = name
    return refused
