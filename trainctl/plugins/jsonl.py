"""Every event, one JSON object per line, to ``OUT/events.jsonl`` (appended across resumes).

Step events are written on logged steps only (the others carry no loss). Each line is flushed
as it is written, so a crash loses nothing already reported. The file is never opened through a
symlink (:func:`trainctl.kernel.run_dir.open_append`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from trainctl.hooks import PluginSpec, RunInfo, hookimpl
from trainctl.hooks.events import (
    CheckpointSaved,
    EvalEnd,
    Notice,
    RolloutReceived,
    RunEnd,
    RunStart,
    StepEnd,
    WeightsPublished,
    to_record,
)
from trainctl.kernel.run_dir import open_append


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    path: str = "events.jsonl"  # relative to the run's out dir


def _finite(value: Any) -> Any:
    # JSON has no NaN/Infinity: write them as strings so every line stays valid JSON
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


class JsonlLogger:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.path = run.out_dir / config.path
        self.enabled = run.is_main
        self.file = None

    def write(self, event: Any) -> None:
        if not self.enabled:
            return
        if self.file is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.file = open_append(self.path, text=True)  # line-buffered
        record = {k: _finite(v) for k, v in to_record(event).items()}
        self.file.write(json.dumps(record) + "\n")

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        self.write(event)

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        if event.logged:
            self.write(event)

    @hookimpl
    def trainctl_rollout_received(self, event: RolloutReceived) -> None:
        self.write(event)  # rollout backends only: one line per step, beside seconds of generation

    @hookimpl
    def trainctl_weights_published(self, event: WeightsPublished) -> None:
        self.write(event)

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        self.write(event)

    @hookimpl
    def trainctl_checkpoint_saved(self, event: CheckpointSaved) -> None:
        self.write(event)

    @hookimpl
    def trainctl_notice(self, event: Notice) -> None:
        self.write(event)

    @hookimpl
    def trainctl_run_end(self, event: RunEnd) -> None:
        self.write(event)
        if self.file is not None:
            self.file.close()
            self.file = None


SPEC = PluginSpec(name="jsonl", factory=JsonlLogger, config=Config,
                  description="Writes every event as a JSON line to OUT/events.jsonl.")
