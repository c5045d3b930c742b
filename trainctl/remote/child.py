"""The eval worker's child process: evaluates the jobs its parent sends over a pipe, one at a
time, and answers ("done", result) or ("error", one line). It is killed when a job runs past the
worker's time limit, and dies with its parent.

Each job's checkpoint is opened from the worker's root without following links, verified and
copied as it is hashed, and only that copy is loaded (:meth:`trainctl.evaluation.Evaluator.evaluate`);
the checkpoint's config passes the worker's :class:`~trainctl.remote.policy.Policy` first.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from trainctl.remote.policy import Limits, Policy
from trainctl.remote.roots import Roots


def serve(conn: Any, roots: list[str], limits: Limits, work_dir: str, device: str | None) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # a checkpoint's config must not make the worker download anything (a hub id, a LoRA
    # adapter's base model): before anything of Hugging Face's is imported
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    from trainctl.evaluation import Evaluator
    from trainctl.kernel.errors import ConfigError

    import torch  # noqa: F401  (before the first job, so it does not pay for it)

    policy = Policy(Roots([Path(r) for r in roots]), limits)
    evaluator = Evaluator(work_dir=Path(work_dir), device=device)
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            break
        try:
            answer = ("done", evaluate(evaluator, policy, job).to_dict())
        except Exception as exc:  # a bad checkpoint or backend ends the job, not the process
            if not isinstance(exc, (ConfigError, OSError, ValueError)):
                traceback.print_exc(file=sys.stderr)
            answer = ("error", f"{type(exc).__name__}: {exc}")
            evaluator.close()  # a failed backend is not reused
        conn.send(answer)
    evaluator.close()


def evaluate(evaluator: Any, policy: Policy, job: dict[str, Any]) -> Any:
    from trainctl.evaluation import SampleRequest
    from trainctl.kernel.errors import ConfigError

    checkpoint, real = job["checkpoint"], Path(job["path"])
    if policy.roots.resolve(job["path"]) != real:
        raise ConfigError(f"checkpoint {checkpoint} now resolves outside the worker's roots")
    try:
        dir_fd = policy.roots.open_dir(real)
    except OSError:
        raise ConfigError(f"checkpoint {checkpoint} is no longer a directory under the worker's roots "
                          "(removed, or replaced by a link)") from None
    try:
        spec = job["evaluate"].get("samples")
        samples = SampleRequest(**{**spec, "prompts": tuple(spec["prompts"])}) if spec else None
        return evaluator.evaluate(Path(checkpoint), dir_fd=dir_fd, step=job["step"], policy=policy,
                                  val_loss=job["evaluate"].get("val_loss", True), samples=samples)
    finally:
        os.close(dir_fd)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the worker dies (else a killed worker would leave its
    evaluation running); elsewhere the closed pipe ends it after the job."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
