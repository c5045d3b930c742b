"""Requeueing the SLURM job a run belongs to, once its requeue signal has ended it.

The controller's ``requeue_signal`` (SLURM's ``--signal=USR1@90`` warning) ends a run as a stop
does, with the reason :data:`REQUEUED` and a committed checkpoint (the kernel's last save is
synchronous and waits for an asynchronous one in flight). At run end rank 0 asks SLURM to put
the job back in the queue (``scontrol requeue $SLURM_JOB_ID``), and every rank exits
:data:`EXIT_REQUEUE`; the requeued job runs its batch script again and ``--resume auto`` takes
that checkpoint. Torch-free: the CLI reads the exit code from here.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping

REQUEUED = "requeued"  # the run's end reason: RunEnd.reason, status.json "reason", the checkpoint's reason
#: The exit code of every rank of a run that ended for a requeue: EX_TEMPFAIL of sysexits.h
#: ("temporary failure; try again later"), what a wrapper or ``RequeueExit=75`` can act on.
EXIT_REQUEUE = 75
SCONTROL_TIMEOUT_S = 30


def requeued(reason: str) -> bool:
    """Whether a run's end reason (the ranks' reasons, joined by ", ") includes a requeue."""
    return REQUEUED in reason.split(", ")


def requeue_job(env: Mapping[str, str]) -> tuple[bool, str]:
    """Ask SLURM to requeue the job of ``env`` (``SLURM_JOB_ID``): whether it was requeued, and
    one line saying what happened. Never raises: the checkpoint is safe whatever SLURM says."""
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job:
        return False, f"not under SLURM (no SLURM_JOB_ID): nothing to requeue; exiting {EXIT_REQUEUE} for whatever restarts the run"
    if not job.isdigit():
        return False, f"SLURM_JOB_ID={job[:40]!r} is not a job id; not requeued (exit {EXIT_REQUEUE})"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return False, f"scontrol requeue {job} failed: no scontrol on PATH; not requeued (exit {EXIT_REQUEUE})"
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"scontrol requeue {job} failed: {exc}; not requeued (exit {EXIT_REQUEUE})"
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split())[:200] or "no output"
        return False, f"scontrol requeue {job} failed (exit {done.returncode}): {said}; not requeued (exit {EXIT_REQUEUE})"
    return True, f"requeued SLURM job {job} (scontrol requeue {job})"
