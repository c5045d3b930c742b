"""The kernel's own config tables, ``[train]`` and ``[optim]``, and the rules every table obeys.

A table is a frozen dataclass; :func:`build` turns a TOML table into one, so an unknown key, a
wrong type or a bad value is a :class:`ConfigError` naming ``section.key`` and the fix. Fields
marked ``locked`` may not change when a run resumes from a checkpoint (model shape, data,
vocabulary): the list of locked keys is part of the schema, read with :func:`locked_keys`.
A field typed as another config dataclass is a sub-table (``[hf.lora]`` inside ``[hf]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from trainctl.kernel.errors import ConfigError

LOCKED = {"locked": True}


def locked(default: Any) -> Any:
    """A field that may not change across a resume (``--force`` overrides)."""
    return field(default=default, metadata=LOCKED)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """``[train]``: what the loop does, how often, and on what device. The defaults train
    nanoGPT's CPU "baby GPT" on the embedded corpus in a few minutes."""

    max_steps: int = 2000
    batch_size: int = 12  # sequences per micro-batch, per rank
    grad_accum: int = 1  # micro-batches per optimizer step, summed over all ranks
    log_interval: int = 10  # steps between measured (host-synced) losses
    eval_interval: int = 250  # steps between evaluations; 0 = only at the end
    eval_steps: int = 20  # batches per split in an evaluation
    eval_at_start: bool = False
    save_interval: int = 0  # steps between checkpoints; 0 = only at the end
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    threads: int = 0  # CPU threads for torch; 0 = one per physical core
    peak_tflops: float = 0.0  # for the MFU estimate; 0 = known accelerators only
    run_name: str = ""  # default: the config file's name, else the out dir's
    out_dir: str = "out"
    plugin_max_failures: int = 3  # observer failures before a plugin is disabled
    dist_timeout_s: float = 120.0  # distributed: a collective waiting longer fails the run (a rank died)
    control_interval: int = 1  # distributed: steps between agreements on stop/save/pause/eval

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_interval", "eval_steps", "control_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("eval_interval", "save_interval", "threads", "plugin_max_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")
        if self.dist_timeout_s <= 0:
            raise ValueError("dist_timeout_s must be positive")
        if self.grad_clip < 0 or self.peak_tflops < 0:
            raise ValueError("grad_clip and peak_tflops must be 0 or more")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """``[optim]``: the optimizer. ``muon`` uses Muon for 2-D hidden weights, AdamW elsewhere."""

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3  # peak learning rate; the lr plugin schedules it
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    muon_lr: float = 0.02
    muon_momentum: float = 0.95

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ValueError("lr and muon_lr must be positive")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.muon_momentum < 1):
            raise ValueError("beta1, beta2 and muon_momentum must be in [0, 1)")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("weight_decay must be 0 or more and eps positive")


def build(cls: type, table: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from a TOML table, or raise a one-line ConfigError."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table, got {_type_name(table)}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"unknown key '{where}.{key}'{did_you_mean(key, known)}")
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in table.items()}
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"[{where}] {exc}") from None


def locked_keys(cls: type) -> list[str]:
    """Names of the fields of ``cls`` that may not change across a resume."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("locked")]


def as_table(obj: Any) -> dict[str, Any]:
    """The TOML table of a config dataclass (lists for tuples, sub-tables for nested ones)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return as_table(value)
    return list(value) if isinstance(value, tuple) else value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {_type_name(value)}")
        items = [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {_type_name(value)}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):  # a sub-table, e.g. [hf.lora]
        return build(hint, value, where)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {_type_name_of(hint)}, got {_type_name(value)} {value!r}")
    return value


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _type_name_of(hint: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))
