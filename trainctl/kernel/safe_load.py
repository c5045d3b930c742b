"""Loading torch files from checkpoints safely, for every backend and the kernel: ``torch.load`` with
``weights_only=True`` only, and a refusal that names the file and what was refused."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

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
