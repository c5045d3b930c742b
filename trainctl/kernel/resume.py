"""The kernel's part of a checkpoint, and resuming a run from one.

A checkpoint holds, beside the backend's files, the kernel's: ``kernel.json`` (the loop's state,
the Python and NumPy RNG, the locked config keys), ``plugins.json`` (every plugin's state) and
``config.toml`` (the resolved config). Resuming reads them back, so they are hostile until
checked: a file is read only if it is a regular file (never a symlink, FIFO or device) of
bounded size, and its values are checked for type and range before anything uses them. A
checkpoint that fails a check is reported like a corrupt one: ``--resume auto`` skips it for the
previous one (the checkpoint plugin does this), an explicit ``--resume PATH`` is a one-line error.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import random
import stat
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl.kernel.checkpoint_files import verify
from trainctl.kernel.errors import ConfigError, PluginError

KERNEL_FILE = "kernel.json"
PLUGINS_FILE = "plugins.json"
CONFIG_FILE = "config.toml"
FORMAT = 1

MAX_JSON_BYTES = 16 << 20  # kernel.json is ~30 KB, plugins.json a few KB: far above any real one
MAX_RNG_BYTES = 1 << 20  # an RNG file is ~6 KB (the CPU generator's 5,056-byte state)
MAX_STEP = 1 << 40  # far beyond any run, and far from int64 overflow in data positions
MAX_COUNT = 1 << 62
MT_WORDS = 624  # the Mersenne Twister's state: 624 32-bit words and a position


class BadCheckpoint(ValueError):
    """A checkpoint's kernel files are unreadable or hold values the kernel cannot use."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Saved:
    """The kernel's files of one checkpoint, read and checked."""

    kernel: dict[str, Any]
    plugins: dict[str, Any]


# --- writing ------------------------------------------------------------------------------------

def kernel_record(*, state: dict[str, Any], run_name: str, backend: str, locked: dict[str, Any]) -> dict[str, Any]:
    """``kernel.json``: the loop's state, the host RNGs and the locked keys, as plain JSON."""
    import numpy as np

    numpy_state = np.random.get_state()
    return {
        "format": FORMAT, "run_name": run_name, "backend": backend, "state": state, "locked": locked,
        "rng": {"python": _lists(random.getstate()), "numpy": _lists(numpy_state)},
        "time": time.time(),
    }


# --- reading and checking -----------------------------------------------------------------------

def read(directory: Path) -> Saved:
    """A checkpoint that verifies, with its kernel files checked; :class:`BadCheckpoint` says
    what is wrong. Every rank reaches the same answer: it reads every rank's RNG file."""
    problem = verify(directory)  # regular files only, no links followed, the manifest's size bounded
    if problem:
        raise BadCheckpoint(problem)
    return read_contents(directory)


def read_contents(directory: Path) -> Saved:
    """The kernel files of a checkpoint, checked (without hashing the checkpoint again)."""
    kernel = _json(directory / KERNEL_FILE)
    problem = kernel_problem(kernel)
    if problem:
        raise BadCheckpoint(f"{KERNEL_FILE}: {problem}")
    plugins = _json(directory / PLUGINS_FILE)
    if not isinstance(plugins, dict):
        raise BadCheckpoint(f"{PLUGINS_FILE}: not a table of plugin states (a JSON {_kind(plugins)})")
    for path in sorted(directory.iterdir()):
        if path.name.startswith("rng") and path.suffix == ".pt":
            problem = rng_problem(read_bounded(path, MAX_RNG_BYTES))
            if problem:
                raise BadCheckpoint(f"{path.name}: {problem}")
    return Saved(kernel=kernel, plugins=plugins)


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes. Opened without
    following a symlink and without blocking (a FIFO would wait for a writer forever), checked on
    the open descriptor, and read no further than ``limit``: ``/dev/zero`` costs nothing."""
    what = path.name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadCheckpoint(f"{what} is missing") from None
    except OSError as exc:
        reason = "is not a regular file" if exc.errno == errno.ELOOP else f"is unreadable ({exc.strerror})"  # ELOOP: a symlink
        raise BadCheckpoint(f"{what} {reason}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadCheckpoint(f"{what} is not a regular file")
        if info.st_size > limit:
            raise BadCheckpoint(f"{what} is larger than {limit} bytes")
        data = os.read(fd, limit + 1)
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    except OSError as exc:
        raise BadCheckpoint(f"{what} is unreadable ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BadCheckpoint(f"{what} is larger than {limit} bytes")
    return data


def kernel_problem(kernel: Any) -> str | None:
    """What is wrong with the values of a ``kernel.json``, or None. Strict: bools are not ints,
    losses are finite, counts fit their range, each RNG state has its generator's shape."""
    if not isinstance(kernel, dict):
        return f"not a table (a JSON {_kind(kernel)})"
    if not _int(kernel.get("format"), FORMAT, FORMAT):
        return f"format {_show(kernel.get('format'))} is not {FORMAT}"
    state = kernel.get("state")
    if not isinstance(state, dict):
        return "state is missing or not a table"
    for key, top in (("step", MAX_STEP), ("tokens", MAX_COUNT)):
        if not _int(state.get(key), 0, top):
            return f"state.{key} = {_show(state.get(key))} is not a whole number from 0 to {top}"
    for key in ("last_loss", "last_val_loss", "best_val_loss"):
        value = state.get(key)
        if value is not None and not _finite(value):
            return f"state.{key} = {_show(value)} is not a finite number"
    locked = kernel.get("locked")
    if not isinstance(locked, dict):
        return "locked is missing or not a table"
    rng = kernel.get("rng")
    if not isinstance(rng, dict):
        return "rng is missing or not a table"
    python, numpy = rng.get("python"), rng.get("numpy")
    # random.getstate(): (3, (624 words..., position), gauss_next or None)
    if not (isinstance(python, list) and len(python) == 3 and _int(python[0], 3, 3) and isinstance(python[1], list)
            and len(python[1]) == MT_WORDS + 1 and _words(python[1][:-1]) and _int(python[1][-1], 0, MT_WORDS)
            and (python[2] is None or _finite(python[2]))):
        return "rng.python is not a Python random state"
    # numpy.random.get_state(): ("MT19937", 624 words, position, has_gauss, cached_gaussian)
    if not (isinstance(numpy, list) and len(numpy) == 5 and numpy[0] == "MT19937" and isinstance(numpy[1], list)
            and len(numpy[1]) == MT_WORDS and _words(numpy[1]) and _int(numpy[2], 0, MT_WORDS)
            and _int(numpy[3], 0, 1) and _finite(numpy[4])):
        return "rng.numpy is not a NumPy random state"
    return None


def rng_problem(data: bytes) -> str | None:
    """What is wrong with an RNG file's bytes (``{"cpu": uint8 tensor, "cuda"?: uint8 tensor}``,
    as ``backends/rng.py`` writes it), or None. Loaded with ``weights_only=True`` only."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rng = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return "holds more than tensors and plain values"
    except Exception as exc:  # any malformed archive: zipfile, EOF, torch's own RuntimeError
        return f"not a torch RNG file ({type(exc).__name__})"
    if not isinstance(rng, dict) or "cpu" not in rng or set(rng) - {"cpu", "cuda"}:
        return "not a table with a 'cpu' generator state"
    size = torch.get_rng_state().numel()
    for key, value in rng.items():
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
            return f"'{key}' is not a generator state (a 1-D byte tensor)"
        if key == "cpu" and value.numel() != size:
            return f"'cpu' holds {value.numel()} bytes, not the {size} of a CPU generator state"
    return None


# --- resuming -----------------------------------------------------------------------------------

def resume(*, path: Path, backend: Any, locked: dict[str, Any], force: bool,
           restore_state: Callable[[dict[str, Any]], None], load_plugins: Callable[[dict[str, Any]], None],
           defaults: dict[str, Any] | None = None) -> None:
    """Restore a run from the checkpoint at ``path``: refuse changed locked keys (unless
    ``force``; a key the checkpoint does not record counts as its value in ``defaults``), then the backend's files, the loop's state, the host RNGs, the plugins' states.
    Every refusal is a one-line ConfigError that names the checkpoint and the way out."""
    import numpy as np

    try:  # the checkpoint plugin verified it; a third-party one may not have checked the values
        saved = read_contents(path)
    except BadCheckpoint as exc:
        raise ConfigError(f"cannot resume from {path}: {exc}; pick another checkpoint or --resume never") from None
    was = saved.kernel["locked"]
    defaults = defaults or {}
    # a key newer than the checkpoint trained with its default
    was = {key: was.get(key, defaults.get(key)) for key in locked}
    changed = [f"{key}: {was[key]!r} -> {value!r}" for key, value in locked.items() if _plain(was[key]) != _plain(value)]
    if changed and not force:
        raise ConfigError(
            f"cannot resume from {path}: locked keys differ ({'; '.join(changed)}); "
            "restore them, start over with --resume never, or pass --force"
        )
    _load_backend(backend, path)
    restore_state(saved.kernel["state"])
    python, numpy = saved.kernel["rng"]["python"], saved.kernel["rng"]["numpy"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), *numpy[2:]))
    try:
        load_plugins(saved.plugins)
    except PluginError as exc:  # a critical plugin refused its state: the run cannot go on from here
        raise ConfigError(f"cannot resume from {path}: {PLUGINS_FILE}: {exc}; resume from another with --resume PATH "
                          "or start over with --resume never") from None


def _load_backend(backend: Any, path: Path) -> None:
    from trainctl.kernel.safe_load import unpickling_reason

    try:
        backend.load(path)
    except pickle.UnpicklingError as exc:  # a backend that let torch.load's refusal through
        raise ConfigError(
            f"refused to load checkpoint {path}: a file holds more than tensors and plain values "
            f"({unpickling_reason(exc)}); resume from another with --resume PATH"
        ) from None
    except (OSError, KeyError, IndexError, TypeError, AttributeError, RuntimeError, ValueError) as exc:
        # a --force over a changed shape, or a file of the wrong kinds of values
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        what = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]  # "Error(s) in ...:" then the error
        raise ConfigError(
            f"cannot load checkpoint {path} into this run ({type(exc).__name__}: {what}); "
            "resume from another with --resume PATH or start over with --resume never"
        ) from None


# --- helpers ------------------------------------------------------------------------------------


def _json(path: Path) -> Any:
    data = read_bounded(path, MAX_JSON_BYTES)
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        reason = str(exc).splitlines()[0][:120] if isinstance(exc, ValueError) else "nested too deeply"
        raise BadCheckpoint(f"{path.name} is not valid JSON ({reason})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _finite(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _words(values: list[Any]) -> bool:
    return all(type(v) is int and 0 <= v < 1 << 32 for v in values)


def _kind(value: Any) -> str:
    return {dict: "table", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _lists(value: Any) -> Any:
    """RNG states as JSON: tuples and arrays become lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
