"""The control channel of a run directory: how ``trainctl ctl`` talks to a live run.

    RUN_DIR/control/                  made private (0700) by the run; a symlink here is refused
    RUN_DIR/control/lock              held (flock) by the live run's kernel; JSON: pid, host, start time
    RUN_DIR/control/cmd-<id>.json     a command, written atomically by ``trainctl ctl``
    RUN_DIR/control/ack-<id>.json     the run's answer: accepted (within one step), then done

The run looks for commands once per step with one ``os.scandir`` of a directory that is almost
always empty. Liveness is the lock: the kernel releases an ``flock`` when its process dies, even
by ``kill -9``, so a stale pid file can never make a dead run look alive.

A command file is hostile until read: its id comes from its name (a short safe charset, so the
answer lands in ``control/`` and nowhere else), it is read only if it is a regular file of a few
KiB (a FIFO or a symlink is refused without blocking), and a bad one never hides the others.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl.control.files import read_json, write_json
from trainctl.kernel.run_dir import CONTROL, LOCK, read_regular

COMMANDS = ("stop", "pause", "resume", "save", "eval")
IDENT = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what `send` makes: time_ns-pid
MAX_COMMAND_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Received:
    """One command file: ``ident`` None when its name is not a valid id (nowhere to answer);
    ``problem`` set when it could not be read as a command (answered ``rejected``)."""

    name: str
    ident: str | None
    command: dict[str, Any] | None
    problem: str | None = None


def control_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CONTROL


def live(run_dir: Path) -> dict[str, Any] | None:
    """The lock's content if a run holds it now, else None."""
    path = control_dir(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_json(path) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def send(run_dir: Path, command: str) -> str:
    """Write a command for the live run; returns its id."""
    ident = f"{time.time_ns()}-{os.getpid()}"
    write_json(control_dir(run_dir) / f"cmd-{ident}.json", {"id": ident, "command": command, "time": time.time()})
    return ident


def take(directory: Path) -> list[Received]:
    """The command files waiting in ``directory``, oldest first, each removed as it is read."""
    try:
        with os.scandir(directory) as entries:
            names = sorted(e.name for e in entries if e.name.startswith("cmd-"))
    except FileNotFoundError:
        return []
    return [_receive(directory, name) for name in names]


def _receive(directory: Path, name: str) -> Received:
    path = directory / name
    ident = name.removeprefix("cmd-").removesuffix(".json")
    valid = name.endswith(".json") and IDENT.fullmatch(ident) is not None
    try:
        data = read_regular(path, MAX_COMMAND_BYTES)
        command = json.loads(data)
        problem = None if isinstance(command, dict) else "not a JSON object"
    except OSError as exc:
        command, problem = None, exc.strerror or str(exc)
    except ValueError as exc:
        command, problem = None, f"not JSON ({exc})"
    try:
        path.unlink()
    except OSError:  # gone already, or a directory: left there, and reported once by the controller
        pass
    return Received(name, ident if valid else None, command if problem is None else None, problem)


def ack_path(directory: Path, ident: str) -> Path:
    """Where the run answers command ``ident`` (``directory`` is the control directory)."""
    if IDENT.fullmatch(ident) is None:  # never a path outside `directory`
        raise ValueError(f"invalid command id {ident[:80]!r}")
    return directory / f"ack-{ident}.json"


def acknowledge(directory: Path, ident: str, answer: dict[str, Any]) -> None:
    write_json(ack_path(directory, ident), {"id": ident, **answer, "time": time.time()})


def withdraw(run_dir: Path, ident: str) -> bool:
    """Take back a command nobody read; True if it was still there."""
    path = control_dir(run_dir) / f"cmd-{ident}.json"
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
