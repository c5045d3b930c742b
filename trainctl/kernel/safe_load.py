"""Loading files from checkpoints safely, for every backend and the kernel: ``torch.load`` with
``weights_only=True`` only, weights through safetensors, and a refusal that names the file and
what was refused. A checkpoint may come from anyone, so whatever its bytes make the reader raise
(a class it may not build, a 2^40-byte allocation, a safetensors header that lies) is one line."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from trainctl.kernel.errors import ConfigError


def load_plain(path: Path, device: torch.device | str) -> dict:
    """``torch.load`` of tensors and plain values only: a pickle of anything else (a class, a
    function, ``os.system``) is refused before any of it runs."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols first
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"refused to load {path}: it holds more than tensors and plain values ({unpickling_reason(exc)}); "
            "the file may have been tampered with: resume from another checkpoint with --resume PATH"
        ) from None
    except Exception as exc:  # noqa: BLE001 - MemoryError, OSError, RuntimeError from hostile bytes: all one answer
        raise ConfigError(f"refused to load {path}: unreadable ({_first_line(exc)}); "
                          "the file is damaged or was tampered with: resume from another checkpoint with --resume PATH") from None


#: What safetensors (and ``from_pretrained`` reading it) raise on a file that is not what it says.
UNREADABLE_WEIGHTS = (SafetensorError, OSError, MemoryError)


def load_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors' ``load_file``; a file it refuses (a header that lies about sizes, offsets or
    dtypes, a truncated file) is one line naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except UNREADABLE_WEIGHTS as exc:
        raise weights_refused(path, exc) from None


def load_safetensors_into(model: torch.nn.Module, path: Path, device: torch.device | str = "cpu") -> None:
    """safetensors' ``load_model`` (tied weights found under whichever name was stored)."""
    from safetensors.torch import load_model

    try:
        load_model(model, str(path), device=str(device))
    except UNREADABLE_WEIGHTS as exc:
        raise weights_refused(path, exc) from None


def weights_refused(path: Path, exc: BaseException) -> ConfigError:
    return ConfigError(f"refused to load {path}: not a readable safetensors file ({_first_line(exc)}); "
                       "the file is damaged or was tampered with")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def unpickling_reason(exc: Exception) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for i, line in enumerate(lines):
        if marker in line:
            rest = line.split(marker, 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return rest.split(". ")[0]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return specific[0].rstrip(".") if specific else type(exc).__name__
