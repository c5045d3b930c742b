"""The eval worker's evaluation thread: takes queued jobs one at a time, oldest first.

Each job is re-checked against the roots, its checkpoint verified against its manifest, and its
step compared with the manifest's before anything is loaded; any problem, and any exception
from the backend, becomes the job's error result. Nothing a job does stops the thread.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from pathlib import Path

from trainctl.remote.jobs import Job, JobStore
from trainctl.remote.roots import Roots


def log(message: str) -> None:
    print(f"eval-worker: {message}", file=sys.stderr, flush=True)


class EvalThread(threading.Thread):
    def __init__(self, store: JobStore, roots: Roots, *, work_dir: Path, device: str | None) -> None:
        super().__init__(name="eval-worker", daemon=True)
        self.store, self.roots = store, roots
        self.work_dir, self.device = work_dir, device
        self.stopping = threading.Event()
        self.ready = threading.Event()  # torch imported: the first job does not pay for it
        self.current: str | None = None

    def run(self) -> None:
        from trainctl.evaluation import Evaluator

        import torch  # noqa: F401  (warm up while the queue may still be empty)

        self.ready.set()
        evaluator = Evaluator(work_dir=self.work_dir, device=self.device)
        while not self.stopping.is_set():
            job = self.store.take(timeout=0.5)
            if job is None:
                continue
            self.current = job.id
            log(f"job {job.id} started: run {job.run} step {job.step} ({job.path}), attempt {job.attempts}")
            started = time.perf_counter()
            try:
                result, error = self.evaluate(evaluator, job), None
            except Exception as exc:  # a bad checkpoint or backend must not stop the worker
                result, error = None, f"{type(exc).__name__}: {exc}"
                if not _is_expected(exc):
                    traceback.print_exc(file=sys.stderr)
                evaluator.close()  # a failed backend is not reused
            self.store.finish(job.id, result=result, error=error)
            self.current = None
            took = time.perf_counter() - started
            if error:
                log(f"job {job.id} error after {took:.1f}s: {error}")
            else:
                log(f"job {job.id} done in {took:.1f}s: val loss {result.get('val_loss')}")
        evaluator.close()

    def evaluate(self, evaluator, job: Job) -> dict:
        from trainctl.evaluation import SampleRequest, checkpoint_step
        from trainctl.kernel.checkpoint_files import verify

        path = self.roots.resolve(job.path)
        if path is None or str(path) != job.path:
            raise JobRejected(f"checkpoint {job.checkpoint} now resolves outside the worker's roots")
        if not path.is_dir():
            raise JobRejected(f"checkpoint {job.checkpoint} no longer exists")
        problem = verify(path)
        if problem:
            raise JobRejected(f"checkpoint {job.checkpoint} does not verify: {problem}")
        step = checkpoint_step(path)
        if step != job.step:
            raise JobRejected(f"checkpoint {job.checkpoint} is step {step}, the job says step {job.step}")
        spec = job.evaluate.get("samples")
        samples = SampleRequest(**{**spec, "prompts": tuple(spec["prompts"])}) if spec else None
        result = evaluator.evaluate(path, val_loss=job.evaluate.get("val_loss", True), samples=samples)
        return result.to_dict()


class JobRejected(Exception):
    """The job cannot be evaluated as submitted (its error result says why)."""


def _is_expected(exc: Exception) -> bool:
    from trainctl.kernel.errors import ConfigError

    return isinstance(exc, (JobRejected, ConfigError, OSError, ValueError))
