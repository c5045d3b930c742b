"""The eval worker's job queue: one JSON file per job in ``STATE/jobs/``, written before the
HTTP answer (write-ahead: temporary file, fsync, rename), so an accepted job survives a crash.

A job's id is random (an id derived from the submission could be claimed first by anyone who
guesses it). Submitting exactly the same request again (run, checkpoint real path, step and
``evaluate``) returns the existing job instead of evaluating it twice; any other request is a job
of its own. A result's numbers that are not finite (NaN weights give a NaN loss) are stored as
null, and a job file that is not strict JSON (UTF-8, finite numbers) is ignored with a log line,
so one job can never make the listings unanswerable. The directory and its files are private
(0700, 0600), whatever the umask. On start, jobs that were
running when the worker died go back to the queue, ahead of newer ones, unless they have been
started ``max_attempts`` times already: a job that kills its worker is not retried forever.

The store is bounded: at most ``max_queue`` jobs wait (more are refused with :class:`QueueFull`),
and finished jobs beyond ``keep_finished`` or older than ``keep_s`` are forgotten, oldest first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["queued", "running", "done", "error"]


@dataclass(kw_only=True, slots=True)
class Job:
    id: str
    run: str
    checkpoint: str  # as submitted
    path: str  # its real path (symlinks resolved), the one that is read
    step: int
    evaluate: dict[str, Any]  # {"val_loss": bool, "samples": {...}}
    seq: int  # FIFO order
    status: Status = "queued"
    attempts: int = 0  # evaluations started: more than 1 only if the worker died mid-job
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def job_id() -> str:
    """Random: an id derived from the submission would let anyone who can guess it claim it first."""
    return secrets.token_hex(8)


def renderable(job: Job) -> bool:
    """The job can be answered as strict JSON: UTF-8 text, finite numbers (a file from before
    these were checked, or written by someone else, may hold neither)."""
    try:
        json.dumps(job.to_dict(), allow_nan=False, ensure_ascii=False).encode("utf-8")  # as Starlette renders it
    except (ValueError, UnicodeEncodeError):
        return False
    return True


def finite(value: Any) -> Any:
    """``value`` with every number that is not finite (NaN weights give a NaN loss) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs already."""


class JobStore:
    """Every job the worker accepted, in memory and on disk. Thread-safe."""

    def __init__(self, state_dir: Path, *, max_attempts: int = 3, max_queue: int = 1000,
                 keep_finished: int = 1000, keep_s: float = 30 * 86400) -> None:
        self.dir = state_dir / "jobs"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for private in (state_dir, self.dir):  # results and samples are for token holders, whatever the umask
            os.chmod(private, 0o700)
        self.max_attempts, self.max_queue = max_attempts, max_queue
        self.keep_finished, self.keep_s = keep_finished, keep_s
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)
        self.requeued = 0
        for file in sorted(self.dir.glob("*.json")):
            try:
                job = Job(**json.loads(file.read_text()))
            except (OSError, ValueError, TypeError, RecursionError):
                continue  # a file not written by us; temporary files are *.tmp
            if not renderable(job):  # it would make every listing that holds it answer 500
                print(f"eval-worker: ignoring {file.name}: not valid UTF-8 JSON with finite numbers", file=sys.stderr)
                continue
            if job.status == "running" and job.attempts >= max_attempts:
                job.status, job.finished = "error", time.time()
                job.error = (f"the worker stopped during each of the {job.attempts} evaluations of this job "
                             f"(killed, crashed or restarted); not retried after {max_attempts} attempts")
                self._write(job)
            elif job.status == "running":  # the worker died mid-job: evaluate it again
                job.status = "queued"
                self._write(job)
                self.requeued += 1
            self._jobs[job.id] = job
        self._seq = max((j.seq for j in self._jobs.values()), default=0)
        with self._lock:
            self._prune()

    def submit(self, *, run: str, checkpoint: str, path: str, step: int, evaluate: dict[str, Any]) -> tuple[Job, bool]:
        """The job for this checkpoint of this run and whether it is new (False: it existed)."""
        with self._lock:
            same = (run, path, step, evaluate)  # the same request: any other differs, and is a job of its own
            existing = next((j for j in self._jobs.values() if (j.run, j.path, j.step, j.evaluate) == same), None)
            if existing is not None:
                return existing, False
            jid = job_id()
            if sum(j.status == "queued" for j in self._jobs.values()) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); submit again later")
            self._seq += 1
            job = Job(id=jid, run=run, checkpoint=checkpoint, path=path, step=step, evaluate=evaluate, seq=self._seq)
            self._write(job)  # durable before anyone is told it was accepted
            self._jobs[jid] = job
            self._queued.notify()
            return job, True

    def get(self, jid: str) -> Job | None:
        with self._lock:
            return self._jobs.get(jid)

    def list(self, run: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs oldest first; with ``limit``, the newest ``limit`` of them."""
        with self._lock:
            jobs = sorted((j for j in self._jobs.values() if run is None or j.run == run), key=lambda j: j.seq)
        return jobs[-limit:] if limit else jobs

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = {s: 0 for s in ("queued", "running", "done", "error")}
            for job in self._jobs.values():
                counts[job.status] += 1
            return counts

    def take(self, timeout: float) -> Job | None:
        """The oldest queued job, now marked running; None if none came within ``timeout``."""
        with self._lock:
            queued = [j for j in self._jobs.values() if j.status == "queued"]
            if not queued:
                self._queued.wait(timeout)
                queued = [j for j in self._jobs.values() if j.status == "queued"]
                if not queued:
                    return None
            job = min(queued, key=lambda j: j.seq)
            job.status, job.started = "running", time.time()
            job.attempts += 1
            self._write(job)
            return dataclasses.replace(job)

    def finish(self, jid: str, *, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        with self._lock:
            job = self._jobs[jid]
            job.status = "error" if error is not None else "done"
            job.result, job.error, job.finished = finite(result), error, time.time()
            self._write(job)
            self._prune()

    def requeue(self, jid: str) -> None:
        """Back to the queue, ahead of newer jobs (its evaluation died; ``attempts`` says how often)."""
        with self._lock:
            job = self._jobs[jid]
            job.status, job.started = "queued", None
            self._write(job)
            self._queued.notify()

    def _prune(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.finished)
        cutoff = time.time() - self.keep_s
        drop = finished[:max(0, len(finished) - self.keep_finished)] + [j for j in finished if j.finished < cutoff]
        for job in drop:
            if self._jobs.pop(job.id, None) is not None:
                (self.dir / f"{job.id}.json").unlink(missing_ok=True)

    def _write(self, job: Job) -> None:
        final = self.dir / f"{job.id}.json"
        tmp = self.dir / f"{job.id}.json.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            json.dump(job.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
