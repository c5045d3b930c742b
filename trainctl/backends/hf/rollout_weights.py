"""The policy's weights as the trainer hands them to rollout workers: ``DIR/weights-v{N}.safetensors``,
N the optimizer steps they have taken.

The trainer writes each version atomically (a temporary file, then ``os.replace``) and keeps the
newest ``KEEP``; a worker reads only what it can trust: a name of that form, opened without
following a link and without blocking (``checkpoint_files.open_regular``: a FIFO, device or link
is refused), read whole and parsed by safetensors (never pickle), and only tensors of the names
and shapes its own model has. Anyone who can write to DIR can still hand the worker other
weights of the right shapes: DIR must be the trainer's (docs/security.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from trainctl.kernel.checkpoint_files import NotVerified, open_checkpoint, open_regular

NAME = re.compile(r"weights-v(\d{1,12})\.safetensors")
KEEP = 2  # the newest and the one before: a worker may be reading it


def file_name(version: int) -> str:
    return f"weights-v{version}.safetensors"


def write(directory: Path, version: int, model: Any) -> None:
    """``model``'s parameters as version ``version``; older versions beyond ``KEEP`` removed."""
    from safetensors.torch import save

    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}  # tied: once; save() copies
    tmp = directory / f".{file_name(version)}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(save(tensors, metadata={"version": str(version)}))
    os.replace(tmp, directory / file_name(version))
    for old in versions(directory)[KEEP:]:
        (directory / file_name(old)).unlink(missing_ok=True)


def clear(directory: Path) -> None:
    """Remove every version (a run starting or resuming: what a worker finds is this run's)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in versions(directory):
        (directory / file_name(old)).unlink(missing_ok=True)


def versions(directory: Path) -> list[int]:
    """The versions in ``directory``, newest first (names only: nothing is opened)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted((int(m[1]) for name in names if (m := NAME.fullmatch(name))), reverse=True)


def read(directory: Path, version: int, expected: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, Any]:
    """The tensors of version ``version``, checked against ``expected`` (name -> (shape, dtype));
    NotVerified with the reason for anything else (a link, a FIFO, not safetensors, a pickle,
    other names or shapes). FileNotFoundError when the trainer has removed it meanwhile."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    name = file_name(version)
    dir_fd = open_checkpoint(directory)
    try:
        fd, size = open_regular(dir_fd, name, missing="")
    except NotVerified as exc:
        if not str(exc):
            raise FileNotFoundError(name) from None
        raise NotVerified(str(exc).replace("a checkpoint holds", "the weights folder holds")) from None
    finally:
        os.close(dir_fd)
    try:
        with os.fdopen(fd, "rb") as handle:  # closes fd
            data = handle.read(size + 1)
    except OSError as exc:
        raise NotVerified(f"{name} cannot be read ({exc.strerror})") from None
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise NotVerified(f"{name} is not a safetensors file ({str(exc).splitlines()[0][:120]}); "
                          "weights are read with safetensors only, never unpickled") from None
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise NotVerified(f"{name} does not hold this model's parameters (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, tensor in tensors.items():
        shape, dtype = expected[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise NotVerified(f"{name}: {key} is {tuple(tensor.shape)} {tensor.dtype}, the model's is {shape} {dtype}")
    return tensors
