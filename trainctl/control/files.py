"""Files in a run directory that other processes read: written atomically (a temporary file in
the same directory, created exclusively, then ``os.replace``), so a reader sees the old content
or the new, never half of it, whatever kills the writer; read only when they are regular files
of bounded size, never through a symlink (see :mod:`trainctl.kernel.run_dir`)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from trainctl.kernel.run_dir import read_regular, write_atomic


MAX_JSON_BYTES = 1 << 20  # status.json, lock and acknowledgements are a few hundred bytes


def write_json(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON, atomically. No fsync: these files describe a
    live process and are rewritten often; after a power loss the old content is as good."""
    write_atomic(path, (json.dumps(value, indent=1) + "\n").encode())


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing, unreadable or not a plain file."""
    try:
        value = json.loads(read_regular(path, MAX_JSON_BYTES))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (signal 0 checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def hostname() -> str:
    return socket.gethostname()
