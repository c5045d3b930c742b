"""Converting a nanoGPT config file (``config/train_shakespeare_char.py`` and the like) to a
trainctl TOML config. Torch-free.

A nanoGPT config is Python that nanoGPT ``exec``s over ``train.py``'s globals. We never execute
it: the file (at most 256 KiB) is parsed with ``ast`` and only top-level ``name = literal``
assignments are read, each value through ``ast.literal_eval``. Anything else (imports, calls,
arithmetic) is reported and left out. Keys the file does not set take nanoGPT's ``train.py`` defaults, so the result
trains what nanoGPT would have trained, not trainctl's defaults.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainctl.kernel.config import put_key
from trainctl.kernel.config_import import check_values, read_source
from trainctl.kernel.errors import ConfigError

WHAT = "nanoGPT config"

#: nanoGPT name -> (our table path, key). Tables are dotted: "plugin.lr".
DIRECT: dict[str, tuple[str, str]] = {
    "max_iters": ("train", "max_steps"),
    "batch_size": ("train", "batch_size"),
    "gradient_accumulation_steps": ("train", "grad_accum"),
    "eval_interval": ("train", "eval_interval"),
    "eval_iters": ("train", "eval_steps"),
    "log_interval": ("train", "log_interval"),
    "grad_clip": ("train", "grad_clip"),
    "device": ("train", "device"),
    "dtype": ("train", "dtype"),
    "compile": ("train", "compile"),
    "out_dir": ("train", "out_dir"),
    "wandb_run_name": ("train", "run_name"),
    "learning_rate": ("optim", "lr"),
    "weight_decay": ("optim", "weight_decay"),
    "beta1": ("optim", "beta1"),
    "beta2": ("optim", "beta2"),
    "min_lr": ("plugin.lr", "min_lr"),
    "warmup_iters": ("plugin.lr", "warmup_steps"),
    "lr_decay_iters": ("plugin.lr", "decay_steps"),
    "n_layer": ("model", "n_layer"),
    "n_head": ("model", "n_head"),
    "n_embd": ("model", "n_embd"),
    "block_size": ("model", "block_size"),
    "dropout": ("model", "dropout"),
    "bias": ("model", "bias"),
}
#: Handled by :func:`convert` itself (they map to more than one key or need the others).
SPECIAL = ("decay_lr", "always_save_checkpoint", "init_from", "dataset", "seed")
#: Known to nanoGPT but with no trainctl equivalent here; reported, not converted.
IGNORED = {
    "eval_only": "evaluation-only runs are not supported",
    "wandb_log": "enable the wandb plugin instead",
    "wandb_project": "set it in [plugin.wandb]",
    "backend": "the DDP backend is chosen automatically",
}
#: nanoGPT's train.py defaults for the training math (device, dtype and compile are left to
#: trainctl's "auto" unless the file sets them).
NANOGPT_DEFAULTS: dict[str, Any] = {
    "out_dir": "out", "eval_interval": 2000, "log_interval": 1, "eval_iters": 200,
    "always_save_checkpoint": True, "init_from": "scratch", "dataset": "openwebtext",
    "gradient_accumulation_steps": 40, "batch_size": 12, "block_size": 1024,
    "n_layer": 12, "n_head": 12, "n_embd": 768, "dropout": 0.0, "bias": False,
    "learning_rate": 6e-4, "max_iters": 600000, "weight_decay": 1e-1, "beta1": 0.9, "beta2": 0.95,
    "grad_clip": 1.0, "decay_lr": True, "warmup_iters": 2000, "lr_decay_iters": 600000, "min_lr": 6e-5,
}


@dataclass(slots=True)
class Conversion:
    tables: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what was not converted, and why


def read_assignments(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Top-level ``name = literal`` assignments of a Python file, never executed. The file is
    read with a bound and every parser failure (deep nesting included) is a one-line ConfigError
    (:mod:`trainctl.kernel.config_import`)."""
    source = read_source(path, WHAT)
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:  # also "too many nested parentheses" and ints past 4300 digits
        raise ConfigError(f"{path}:{exc.lineno}: not valid Python ({exc.msg})") from None
    except (RecursionError, MemoryError):  # the parser's own limits: 1+1+... or ----1 thousands deep
        raise ConfigError(f"{path}: nested too deep to parse; a {WHAT} is plain `name = value` lines") from None
    except ValueError as exc:  # a NUL byte in the source
        raise ConfigError(f"{path}: not valid Python ({exc})") from None
    lines = source.splitlines()
    values: dict[str, Any] = {}
    notes: list[str] = []
    for node in tree.body:
        shown = lines[node.lineno - 1].strip()[:60] if node.lineno <= len(lines) else ""  # not ast.unparse: it recurses
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            notes.append(f"line {node.lineno}: skipped a statement that is not `name = value`: {shown}")
            continue
        name = node.targets[0].id
        try:
            values[name] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):  # TypeError: {[1]: 2}
            notes.append(f"line {node.lineno}: skipped {name}: its value is not a literal ({shown})")
    check_values(values, path, WHAT)
    return values, notes


def convert(values: dict[str, Any]) -> Conversion:
    """nanoGPT names and values -> trainctl tables."""
    notes: list[str] = []
    given = dict(values)
    merged = NANOGPT_DEFAULTS | given
    tables: dict[str, Any] = {"seed": given.get("seed", 1337), "backend": "gpt"}

    put = functools.partial(put_key, tables)

    for name, value in merged.items():
        if name in DIRECT:
            put(*DIRECT[name], value)
        elif name in IGNORED:
            if name in given:
                notes.append(f"{name}: not converted ({IGNORED[name]})")
        elif name not in SPECIAL:
            notes.append(f"{name}: unknown nanoGPT setting, not converted")
    put("train", "eval_at_start", True)  # nanoGPT evaluates at iteration 0 too
    if merged["decay_lr"]:
        put("plugin.lr", "schedule", "cosine")
    else:  # nanoGPT without decay: the learning rate is constant from the first step
        put("plugin.lr", "schedule", "constant")
        put("plugin.lr", "warmup_steps", 0)
    if merged["always_save_checkpoint"]:
        put("train", "save_interval", merged["eval_interval"])  # nanoGPT saves at every evaluation
    else:
        put("plugin.checkpoint", "save_best", True)  # ... or only when val loss improved
    init = merged["init_from"]
    if init == "resume":
        put("model", "init_from", f"{merged['out_dir']}/ckpt.pt")
        notes.append(f"init_from = 'resume': starting from the weights of {merged['out_dir']}/ckpt.pt (optimizer and step start fresh)")
    elif isinstance(init, str) and init.startswith("gpt2"):
        notes.append(f"init_from = {init!r}: pretrained GPT-2 weights are not downloaded here; use the hf backend or a local ckpt.pt")
    else:
        put("model", "init_from", init)
    dataset = merged["dataset"]
    put("data", "path", f"data/{dataset}")
    notes.append(f"dataset = {dataset!r} became data.path = 'data/{dataset}' (nanoGPT's layout: train.bin, val.bin, meta.pkl)")
    return Conversion(tables=_ordered(tables), notes=notes)


def _ordered(tables: dict[str, Any]) -> dict[str, Any]:
    order = ["seed", "backend", "train", "optim", "model", "data", "plugin"]
    return {k: tables[k] for k in order if k in tables}


def import_file(path: Path) -> Conversion:
    values, notes = read_assignments(path)
    conversion = convert(values)
    conversion.notes[:0] = notes
    return conversion
