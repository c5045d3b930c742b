"""Where the time went between the last step before a fault and the first step after it.

A resumed run (torchrun restarted its group, SLURM requeued the job, a person ran it again)
measures, once, with a handful of ``time.time()`` reads taken while it is assembled::

    last step before the fault   the newest step time the run left: its events.jsonl's last
                                 record, else the resumed-from checkpoint's kernel.json time
    down_s                       -> this process started (/proc: the fault, its detection, the
                                    launcher's restart and its own rendezvous of agents)
    process_start_s              -> the run's assembly began (interpreter, imports, config)
    rendezvous_s                 -> the process group is formed (init_process_group)
    setup_s                      -> plugins and backend built (model, data, optimizer)
    checkpoint_load_s            -> the checkpoint is restored
    first_step_s                 -> the first step after the resume has finished (run_start too)

The phases are differences of consecutive times, so they add up to ``total_s`` exactly; each
is >= 0 unless the clocks of two hosts disagree (``down_s`` compares this host's clock with the
one that wrote the last record). The kernel sends them as one ``recovery`` notice after the
first step; nothing is measured on any later step.

``restarts`` is how many times the run was started again by its launcher: torchrun's
``TORCHELASTIC_RESTART_COUNT`` plus SLURM's ``SLURM_RESTART_COUNT`` (a requeued job's torchrun
counts from 0 again).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

IMPORTED = time.time()  # this process's start where /proc cannot say (not Linux)
EVENTS_FILE = "events.jsonl"  # the jsonl plugin's file, read if the run wrote one
TAIL_BYTES = 65536  # the last records only: the file grows with the run
PHASES = ("down_s", "process_start_s", "rendezvous_s", "setup_s", "checkpoint_load_s", "first_step_s")


def restarts() -> int:
    """Restarts of this run by its launchers (0 when started by hand or for the first time)."""
    total = 0
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        value = os.environ.get(name, "")
        total += int(value) if value.isdigit() else 0
    return total


def process_started() -> float:
    """Unix time this process started: /proc's start tick (10 ms) against the boot clock."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rpartition(")")[2].split()[19])  # field 22, starttime; comm may hold spaces
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return IMPORTED


def last_step_time(out_dir: Path, checkpoint: Path) -> tuple[float | None, int | None, str]:
    """The newest (time, step) the run left before this process, and where it was read."""
    events = out_dir / EVENTS_FILE
    try:
        with events.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            lines = f.read().splitlines()
        for line in reversed(lines[1:] if len(lines) > 1 else lines):  # the first may be cut
            record = json.loads(line)
            if record.get("event") == "step":
                return float(record["time"]), int(record["step"]), "events"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        kernel = json.loads((checkpoint / "kernel.json").read_text())
        return float(kernel["time"]), int(kernel["state"]["step"]), "checkpoint"
    except (OSError, ValueError, KeyError, TypeError):
        return None, None, "none"


@dataclass(slots=True)
class Recovery:
    """The assembly's times, filled in order by :class:`~trainctl.kernel.run.Run`."""

    process: float = field(default_factory=process_started)
    assembly: float = field(default_factory=time.time)
    rendezvous: float = 0.0
    setup: float = 0.0
    loaded: float = 0.0
    last: tuple[float | None, int | None, str] = (None, None, "none")

    def resumed(self, out_dir: Path, checkpoint: Path) -> None:
        """The checkpoint is restored: read what the run left before this process wrote to it."""
        self.loaded = time.time()
        self.last = last_step_time(out_dir, checkpoint)

    def record(self, first_step: float) -> dict[str, object]:
        """The ``recovery`` notice's data, once the first step after the resume has finished."""
        last, step, source = self.last
        start = last if last is not None else self.process
        times = (start, self.process, self.assembly, self.rendezvous, self.setup, self.loaded, first_step)
        phases = {name: round(b - a, 3) for name, a, b in zip(PHASES, times, times[1:])}
        return {"restarts": restarts(), "last_step": step, "last_step_source": source, **phases,
                "total_s": round(sum(phases.values()), 3)}
