"""The kernel's own config tables, ``[train]`` and ``[optim]``, and the rules every table obeys.

A table is a frozen dataclass; :func:`build` turns a TOML table into one, so an unknown key, a
wrong type or a bad value is a :class:`ConfigError` naming ``section.key`` and the fix. Every
value that reaches a typed field passes the same checks, here and nowhere else:

- its type (an int is accepted for a float; a bool is never an int; a section must be a table;
  a fixed-length tuple must have its length);
- numbers are finite (TOML's ``nan``/``inf`` are refused unless a field says ``finite=False``)
  and integers fit in 64 bits; a field's bounds (:func:`ranged`) are checked with the key named;
- strings hold no control characters but tab and newline (a NUL in a path or a device string
  would otherwise end deep inside the OS or torch).

Fields marked ``locked`` may not change when a run resumes from a checkpoint (model shape, data,
vocabulary): the list of locked keys is part of the schema, read with :func:`locked_keys`.
A field typed as another config dataclass is a sub-table (``[hf.lora]`` inside ``[hf]``).
``__post_init__`` is left with the rules that relate several fields (``n_embd % n_head``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

from trainctl.kernel import foreign_names
from trainctl.kernel.errors import ConfigError

LOCKED = {"locked": True}
INT_LIMIT = 2**63  # a TOML integer is 64-bit; larger ones would overflow in torch or numpy
TEXT_CONTROLS = "\t\n\r"  # the control characters that text (a chat template, a prompt) may hold
DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,4})?")


def locked(default: Any) -> Any:
    """A field that may not change across a resume (``--force`` overrides)."""
    return field(default=default, metadata=LOCKED)


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, finite: bool = True, lock: bool = False) -> Any:
    """A number field with bounds, checked by :func:`build` with the key named in the error."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"bounds": bounds, "finite": finite, "locked": lock})


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """``[train]``: what the loop does, how often, and on what device. The defaults train
    nanoGPT's CPU "baby GPT" on the embedded corpus in a few minutes."""

    max_steps: int = ranged(2000, ge=1)
    batch_size: int = ranged(12, ge=1)  # sequences per micro-batch, per rank
    grad_accum: int = ranged(1, ge=1)  # micro-batches per optimizer step, summed over all ranks
    log_interval: int = ranged(10, ge=1)  # steps between measured (host-synced) losses
    eval_interval: int = ranged(250, ge=0)  # steps between evaluations; 0 = only at the end
    # "steps": every eval_interval steps; "epoch": at each epoch's end instead (TRL's eval_strategy;
    # the backend counts epochs: hf). Either way, once more at the end of the run
    eval_strategy: Literal["steps", "epoch"] = "steps"
    eval_steps: int = ranged(20, ge=0)  # batches per split in an evaluation; 0 = the whole split (hf)
    eval_batch_size: int = ranged(0, ge=0)  # rows per evaluation batch; 0 = batch_size
    # the reported eval loss: "tokens" the mean over every scored token; "batches" transformers'
    # Trainer's (so TRL's): each batch's token mean, averaged over the batches weighted by their rows
    eval_loss: Literal["tokens", "batches"] = "tokens"
    eval_at_start: bool = False
    save_interval: int = ranged(0, ge=0)  # steps between checkpoints; 0 = only at the end
    save_strategy: Literal["steps", "epoch"] = "steps"  # "epoch": a checkpoint at each epoch's end instead of save_interval's
    grad_clip: float = ranged(1.0, ge=0)  # max gradient norm; 0 = off
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    threads: int = ranged(0, ge=0, le=4096)  # CPU threads for torch; 0 = one per physical core
    peak_tflops: float = ranged(0.0, ge=0)  # for the MFU estimate; 0 = known accelerators only
    run_name: str = ""  # default: the config file's name, else the out dir's
    out_dir: str = "out"
    plugin_max_failures: int = ranged(3, ge=0)  # observer failures before a plugin is disabled
    # distributed: a collective waiting longer fails the run (a rank died); torch wants a timedelta
    dist_timeout_s: float = ranged(120.0, gt=0, le=7 * 24 * 3600)
    control_interval: int = ranged(1, ge=1)  # distributed: steps between agreements on stop/save/pause/eval
    # how the model is placed over the ranks: ddp replicates it, fsdp shards parameters,
    # gradients and optimizer state (FSDP2, one unit per transformer block); any number of ranks
    parallel: Literal["ddp", "fsdp"] = "ddp"
    fsdp_reshard_after_forward: bool = True  # fsdp: free each block's gathered weights after forward (less memory)
    cpu_offload: bool = False  # fsdp: keep parameters, gradients and optimizer state in CPU memory
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    # refuse, before anything is allocated, a run whose estimated memory clearly exceeds what the
    # device has (the memory plan: trainctl/backends/memory.py); false: train anyway
    memory_check: bool = True

    def __post_init__(self) -> None:
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.cpu_offload and self.parallel != "fsdp":
            raise ValueError("cpu_offload needs parallel = 'fsdp' (DDP keeps the whole model on every device); set train.parallel = 'fsdp'")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """``[optim]``: the optimizer. ``muon`` uses Muon for 2-D hidden weights, AdamW elsewhere."""

    # adafactor: transformers' (as TRL's optim = "adafactor"); adamw_8bit: bitsandbytes (CUDA)
    name: Literal["adamw", "muon", "sgd", "adafactor", "adamw_8bit"] = "adamw"
    # adamw's kernel: auto = fused on CPU and CUDA; "fused", "foreach" or "for_loop" as torch names them;
    # "default" torch's own choice (fused=None, foreach=None: TrainingArguments' optim = "adamw_torch")
    implementation: Literal["auto", "fused", "foreach", "for_loop", "default"] = "auto"
    momentum: float = ranged(0.0, ge=0, lt=1)  # sgd only
    lr: float = ranged(1e-3, gt=0)  # peak learning rate; the lr plugin schedules it
    weight_decay: float = ranged(0.1, ge=0)
    beta1: float = ranged(0.9, ge=0, lt=1)
    beta2: float = ranged(0.99, ge=0, lt=1)
    eps: float = ranged(1e-8, gt=0)
    muon_lr: float = ranged(0.02, gt=0)
    muon_momentum: float = ranged(0.95, ge=0, lt=1)


def build(cls: type, table: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from a TOML table, or raise a one-line ConfigError."""
    require_table(table, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(f"unknown key '{where}.{key}'{foreign_names.hint(key, f'{where}.{key}') or did_you_mean(key, fields)}")
    hints = typing.get_type_hints(cls)
    values = {
        key: checked(value, hints[key], f"{where}.{key}", **_rules(fields[key]))
        for key, value in table.items()
    }
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"[{where}] {exc}") from None


def require_table(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a table (a section set to a scalar is a ConfigError)."""
    if not isinstance(value, dict):
        raise ConfigError(f"[{where}] must be a table, got {_type_name(value)} {_shown(value)}; set its keys instead: {where}.KEY = VALUE")
    return value


def checked(value: Any, hint: Any, where: str, *, bounds: dict[str, float] | None = None, finite: bool = True) -> Any:
    """``value`` as the type ``hint`` asks for, checked (type, finiteness, text, ``bounds``), or a
    one-line ConfigError naming ``where``. The one gate every config value passes through."""
    value = _coerce(value, hint, where, finite)
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            _check_bounds(item, bounds or {}, where)
    return value


def locked_keys(cls: type) -> list[str]:
    """Names of the fields of ``cls`` that may not change across a resume."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("locked")]


def as_table(obj: Any) -> dict[str, Any]:
    """The TOML table of a config dataclass (lists for tuples, sub-tables for nested ones)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def as_table_value(value: Any) -> Any:
    """One value as :func:`as_table` writes it (lists for tuples)."""
    return _plain(value)


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return as_table(value)
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _rules(f: dataclasses.Field) -> dict[str, Any]:
    return {"bounds": f.metadata.get("bounds", {}), "finite": f.metadata.get("finite", True)}


COMPARE = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
WORDS = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}


def _check_bounds(value: float, bounds: dict[str, float], where: str) -> None:
    for kind, limit in bounds.items():
        if not COMPARE[kind](value, limit):
            shown = limit if isinstance(limit, int) else f"{limit:g}"
            raise ConfigError(f"{where} must be {WORDS[kind]} {shown}, got {value!r}")


def _coerce(value: Any, hint: Any, where: str, finite: bool = True) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, where, finite)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where} must be one of {choices}, got {_shown(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {_type_name(value)} {_shown(value)}")
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} items, got {len(value)}")
        items = [_coerce(v, args[i] if fixed else args[0], f"{where}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {_type_name(value)} {_shown(value)}")
        return dict(value)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):  # a sub-table, e.g. [hf.lora]
        return build(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (hint in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {_type_name_of(hint)}, got {_type_name(value)} {_shown(value)}")
    if isinstance(value, float) and finite and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
        raise ConfigError(f"{where} is out of range (a 64-bit integer), got {value}")
    if isinstance(value, str):
        bad = next((c for c in value if c not in TEXT_CONTROLS and unicodedata.category(c) in ("Cc", "Cs")), None)
        if bad is not None:
            raise ConfigError(f"{where} must not hold control characters, got {ascii(bad)} in {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A value as an error line may show it: one line, ASCII, at most ~60 characters."""
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _type_name_of(hint: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))
