"""The files of a checkpoint directory, shared by the checkpoint plugin, resume, ``trainctl
sample``/``eval`` and the eval worker: names, the sha256 manifest, verification, and the
atomic seal (fsync every file, manifest last, rename into place).

A directory is a checkpoint only once its manifest is in place and every file it lists matches
its sha256: a kill at any instant leaves complete checkpoints under ``step-*`` names and, at
most, a ``.tmp-*`` directory that the next run removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = "manifest.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"  # in-progress writes and checkpoints being removed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (incomplete)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    for name, expected in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != expected:
            return f"{name} does not match its sha256"
    return None


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: (step_of(p), p.name))  # by number: step-1000000 after step-999999


def seal(tmp: Path, final: Path, step: int, reason: str) -> None:
    """Hash and fsync every file, write the manifest last, rename into place."""
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    for file in files:
        fsync_path(tmp / file)
    manifest = {"step": step, "reason": reason, "files": files, "time": time.time()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)
    if final.exists():  # from an abandoned branch (--resume never or an older PATH), or corrupt
        discard(final)
    os.rename(tmp, final)
    fsync_path(final.parent)


def discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed out of the ``step-*`` names first (atomic), so a
    crash halfway through the deletion never leaves a partial checkpoint under a real name."""
    trash = path.with_name(f"{TMP_PREFIX}old-{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix(PREFIX))
    except ValueError:
        return 0
