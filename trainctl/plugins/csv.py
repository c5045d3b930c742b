"""``OUT/metrics.csv``: one row per logged step, with the evaluation losses of that step in the
same row (``eval_val_loss``, ``eval_train_loss``; remote ones suffixed with their source).

A row is written (and flushed) as soon as the next step starts, so the evaluations that follow a
step land in its row. A column that appears later (a loss term, a new split) rewrites the file
once with the wider header. On resume, rows past the checkpoint's step, which the run is about to
train again, are dropped so every step appears once.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from trainctl.hooks import PluginSpec, RunInfo, hookimpl
from trainctl.hooks.events import EvalEnd, RunEnd, RunStart, StepEnd
from trainctl.kernel.run_dir import open_append, write_atomic

BASE = ["step", "time", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time", "mfu", "skipped"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    path: str = "metrics.csv"  # relative to the run's out dir


class CsvLogger:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.path = run.out_dir / config.path
        self.enabled = run.is_main
        self.columns: list[str] = list(BASE)
        self.file: Any = None
        self.writer: Any = None
        self.row: dict[str, Any] | None = None  # the current step's row, until the next step

    def _rewrite(self, keep: Any = lambda row: True) -> None:
        """Rewrite the file with the current columns, keeping the rows ``keep`` accepts."""
        rows = []
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [row for row in csv.DictReader(f) if keep(row)]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, text.getvalue().encode())  # an exclusive temporary file, never a symlink

    def _open(self) -> None:
        self.file = open_append(self.path, text=True)
        self.writer = csv.DictWriter(self.file, self.columns)

    def _flush_row(self) -> None:
        row, self.row = self.row, None
        if row is None:
            return
        if not set(row) <= set(self.columns):
            self.columns += [k for k in row if k not in self.columns]
            self.file.close()
            self._rewrite()
            self._open()
        self.writer.writerow(row)
        self.file.flush()

    def _row(self, step: int) -> dict[str, Any]:
        if self.row is not None and self.row["step"] != step:
            self._flush_row()
        if self.row is None:
            self.row = {"step": step}
        return self.row

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            self.columns = header + [c for c in BASE if c not in header]
            self._rewrite(lambda row: row.get("step", "").isdigit() and int(row["step"]) <= event.start_step)
        else:
            self._rewrite()
        self._open()

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        if not self.enabled:
            return
        if self.row is not None and self.row["step"] != event.step:
            self._flush_row()
        if not event.logged:
            return
        self._row(event.step).update({
            "time": round(event.time, 3), "loss": event.loss, "lr": event.lr, "grad_norm": event.grad_norm,
            "tokens": event.tokens, "tokens_per_s": event.tokens_per_s, "step_time": event.step_time,
            "mfu": event.mfu, "skipped": int(event.skipped), **event.metrics,
        })

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        if not self.enabled:
            return
        suffix = "" if event.source == "local" else f"_{event.source}"
        self._row(event.step)[f"eval_{event.split}_loss{suffix}"] = event.loss

    @hookimpl
    def trainctl_run_end(self, event: RunEnd) -> None:
        if self.file is not None:
            self._flush_row()
            self.file.close()
            self.file = None


SPEC = PluginSpec(name="csv", factory=CsvLogger, config=Config,
                  description="One row per logged step (with that step's evaluation losses) in OUT/metrics.csv.")
