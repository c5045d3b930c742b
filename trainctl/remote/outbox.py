"""The ``remote_eval`` plugin's durable outbox: one JSON file per checkpoint to evaluate, in
``OUT/remote_eval/outbox/step-NNNNNN.json``, written by a temporary file and a rename.

A submission is written on the training thread when its checkpoint is saved, before anything is
sent, so a crash, a worker that is down, or the end of the run loses nothing: what is still open
is sent again by the next process that trains in this run directory. Statuses::

    pending -> submitted (the worker accepted it: job id known) -> done | error
    pending -> rejected (the worker refused it for good, e.g. the checkpoint was deleted)
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OPEN = ("pending", "submitted")


@dataclass(kw_only=True, slots=True)
class Submission:
    step: int
    checkpoint: str
    status: Literal["pending", "submitted", "done", "error", "rejected"] = "pending"
    job: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Outbox:
    """Every submission of a run, by step. Thread-safe: the training thread adds, the plugin's
    sender thread updates; callers get copies."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        self._subs: dict[int, Submission] = {}
        if directory.is_dir():
            for file in sorted(directory.glob("step-*.json")):
                try:
                    sub = Submission(**json.loads(file.read_text()))
                except (OSError, ValueError, TypeError):
                    continue
                self._subs[sub.step] = sub

    def add(self, sub: Submission) -> bool:
        """Record a new submission; False if this step is already known (nothing is written)."""
        with self._lock:
            if sub.step in self._subs:
                return False
            self._write(sub)
            self._subs[sub.step] = dataclasses.replace(sub)
            return True

    def update(self, sub: Submission) -> None:
        with self._lock:
            self._write(sub)
            self._subs[sub.step] = dataclasses.replace(sub)

    def open(self) -> list[Submission]:
        """Submissions not finished yet, oldest step first."""
        with self._lock:
            return [dataclasses.replace(s) for _, s in sorted(self._subs.items()) if s.status in OPEN]

    def all(self) -> list[Submission]:
        with self._lock:
            return [dataclasses.replace(s) for _, s in sorted(self._subs.items())]

    def _write(self, sub: Submission) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{sub.step:06d}.json"
        tmp = final.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sub.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
