"""The eval worker's evaluation thread: takes queued jobs one at a time, oldest first, and has
each evaluated in a child process (:mod:`trainctl.remote.child`).

The child is what a hostile job can hurt, so the thread only waits on it: for at most
``job_timeout_s``, after which the child is killed and the job ends as an error. A child that
dies mid-job (a crash, the OOM killer) is replaced, and the job queued again until it has been
started ``max_attempts`` times (counted on disk, so a restart of the whole worker counts too).
The child lives on between jobs, so torch is imported once and a run's backend is reused.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainctl.remote.jobs import Job, JobStore
from trainctl.remote.policy import Limits
from trainctl.remote.roots import Roots


def log(message: str) -> None:
    print(f"eval-worker: {message}", file=sys.stderr, flush=True)


STARTUP_S = 300.0  # for the child to import torch, on a busy machine


class ChildEvaluator:
    """The child process and the pipe to it; started on first use and after any death."""

    def __init__(self, roots: Roots, limits: Limits, *, work_dir: Path, device: str | None) -> None:
        self.args = ([str(d) for d in roots.dirs], limits, str(work_dir), device)
        self.proc: Any = None
        self.conn: Any = None
        self.ready = False  # the child said it has imported torch

    def start(self) -> None:
        from trainctl.remote.child import serve

        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self.conn, theirs = context.Pipe()
        self.proc = context.Process(target=serve, args=(theirs, *self.args), name="eval-worker-job", daemon=True)
        self.proc.start()
        theirs.close()
        self.ready = False

    def evaluate(self, job: Job, timeout: float) -> tuple[str, Any]:
        """("done", result) | ("error", message) | ("timeout", None) | ("died", why)."""
        try:
            if self.proc is None or not self.proc.is_alive():
                self.start()
            if not self.ready:  # a job's time starts once torch is imported, not before
                if not self.conn.poll(STARTUP_S) or self.conn.recv()[0] != "ready":
                    raise OSError("the evaluation process did not start")
                self.ready = True
            self.conn.send(job.to_dict())
            if not self.conn.poll(timeout):
                self.kill()
                return "timeout", None
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.kill()
            if code is None:
                return "died", "it stopped answering"
            return "died", f"exit code {code}" if code >= 0 else f"signal {-code}"

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
            self.conn.close()
            self.proc = self.conn = None


class EvalThread(threading.Thread):
    def __init__(self, store: JobStore, roots: Roots, *, work_dir: Path, device: str | None,
                 limits: Limits | None = None) -> None:
        super().__init__(name="eval-worker", daemon=True)
        self.store, self.limits = store, limits or Limits()
        self.child = ChildEvaluator(roots, self.limits, work_dir=work_dir, device=device)
        self.stopping = threading.Event()
        self.current: str | None = None

    def run(self) -> None:
        self.child.start()  # torch is imported while the queue may still be empty
        while not self.stopping.is_set():
            job = self.store.take(timeout=0.5)
            if job is None:
                continue
            self.current = job.id
            log(f"job {job.id} started: run {escape(job.run)} step {job.step} ({escape(job.path)}), "
                f"attempt {job.attempts}")
            started = time.perf_counter()
            kind, value = self.child.evaluate(job, self.limits.job_timeout_s)
            took = time.perf_counter() - started
            self.current = None
            if kind == "done":
                self.store.finish(job.id, result=value)
                log(f"job {job.id} done in {took:.1f}s: val loss {value.get('val_loss')}")
                continue
            if kind == "died" and job.attempts < self.limits.max_attempts:
                self.store.requeue(job.id)
                log(f"job {job.id}: its evaluation process died ({value}) after {took:.1f}s; queued again")
                continue
            if kind == "timeout":
                value = (f"the evaluation took longer than {self.limits.job_timeout_s:g}s (the worker's --job-timeout) "
                         "and was stopped")
            elif kind == "died":
                value = (f"the evaluation process died ({value}) in each of {job.attempts} attempts; "
                         "not retried")
            self.store.finish(job.id, error=value)
            log(f"job {job.id} error after {took:.1f}s: {escape(value)}")
        self.child.kill()


def escape(text: str) -> str:
    """A field for a log line: control characters (a newline would forge a line) escaped."""
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
