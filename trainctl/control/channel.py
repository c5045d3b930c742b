"""The control channel of a run directory: how ``trainctl ctl`` talks to a live run.

    RUN_DIR/control/lock              held (flock) by the live run; JSON: pid, host, start time
    RUN_DIR/control/cmd-<id>.json     a command, written atomically by ``trainctl ctl``
    RUN_DIR/control/ack-<id>.json     the run's answer: accepted (within one step), then done

The run looks for commands once per step with one ``os.scandir`` of a directory that is almost
always empty. Liveness is the lock: the kernel releases an ``flock`` when its process dies, even
by ``kill -9``, so a stale pid file can never make a dead run look alive.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO, Any

from trainctl.control.files import hostname, read_json, write_json
from trainctl.kernel.errors import ConfigError

CONTROL_DIR = "control"
LOCK = "lock"
COMMANDS = ("stop", "pause", "resume", "save", "eval")


def control_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CONTROL_DIR


def acquire(run_dir: Path) -> IO[str]:
    """Take the run directory's lock for this process (released when the file is closed or the
    process dies). A second live run in the same directory is a ConfigError."""
    directory = control_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("cmd-*.json"):  # for a run that is gone: never replay them
        stale.unlink(missing_ok=True)
    f = open(directory / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"another run is live in {run_dir} ({holder}); stop it first (trainctl ctl {run_dir} stop) "
            "or choose another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f'{{"pid": {os.getpid()}, "host": "{hostname()}", "started": {time.time():.3f}}}\n')
    f.flush()
    return f


def live(run_dir: Path) -> dict[str, Any] | None:
    """The lock's content if a run holds it now, else None."""
    path = control_dir(run_dir) / LOCK
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_json(path) or {}
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def send(run_dir: Path, command: str) -> str:
    """Write a command for the live run; returns its id."""
    ident = f"{time.time_ns()}-{os.getpid()}"
    write_json(control_dir(run_dir) / f"cmd-{ident}.json", {"id": ident, "command": command, "time": time.time()})
    return ident


def take(directory: Path) -> list[dict[str, Any]]:
    """The commands waiting in ``directory``, oldest first, removed as they are read."""
    try:
        names = sorted(e.name for e in os.scandir(directory) if e.name.startswith("cmd-"))
    except FileNotFoundError:
        return []
    commands = []
    for name in names:
        path = directory / name
        command = read_json(path)
        path.unlink(missing_ok=True)
        if command is not None:
            command.setdefault("id", name.removeprefix("cmd-").removesuffix(".json"))
            commands.append(command)
    return commands


def ack_path(directory: Path, ident: str) -> Path:
    """Where the run answers command ``ident`` (``directory`` is the control directory)."""
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
