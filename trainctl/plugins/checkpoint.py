"""Checkpoints: one directory per checkpoint, complete or absent (the files and the atomic
seal are in :mod:`trainctl.kernel.checkpoint_files`; this plugin owns when, where and how many).

Layout::

    OUT/checkpoints/step-000500/   the backend's files (gpt: model.safetensors, optimizer.pt,
                                   rng-rank0.pt, model.json, data_meta.json), the kernel's
                                   (kernel.json: step = data position, python/numpy RNG, locked
                                   keys; plugins.json; config.toml) and manifest.json (sha256 of
                                   every other file; written last)
    OUT/checkpoints.jsonl          the ledger: one line per checkpoint written

A checkpoint is written into a temporary directory, every file fsynced, the manifest written
last, then the directory renamed into place: a directory without a verified manifest is not a
checkpoint. Old checkpoints are removed only after the new one is in place, and removal renames
them out of the way first, so a kill at any instant leaves only complete checkpoints under
``step-*`` names (and perhaps a ``.tmp-*`` directory, removed when the next run starts).

Policies: every ``train.save_interval`` steps (the kernel's cadence), after an evaluation that
improved the best validation loss (``save_best``), at the end, and on demand (signals, ``trainctl
ctl``); ``keep_last`` keeps the newest K and the best. A write that fails (disk full) fails the
run, leaving the previous checkpoints as they were: this plugin is critical.

Distributed runs: rank 0 makes the temporary directory and tells the others its name; every rank
writes its own files into it (``rng-rankN.pt``; rank 0 also the weights and the kernel's files);
once all are done rank 0 writes the manifest, listing every rank's files, and renames. Only rank
0 writes the ledger and prunes. The run directory must be on storage every rank sees.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import Control, EvalEnd, Notice, RunStart, RunView
from trainctl.kernel.checkpoint_files import (
    MANIFEST, PREFIX, TMP_PREFIX, checkpoints, discard, seal, sha256_file, step_of, verify,
)
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run_dir import open_append

LEDGER = "checkpoints.jsonl"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    dir: str = "checkpoints"  # relative to the out dir
    keep_last: int = 0  # keep the newest K checkpoints (and the best); 0 = keep all
    save_best: bool = False  # also save after an evaluation that improved the val loss

    def __post_init__(self) -> None:
        if self.keep_last < 0:
            raise ValueError("keep_last must be 0 (keep all) or more")


class Checkpointer:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config = config
        self.run = run
        self.root = run.out_dir / config.dir
        self.ledger = run.out_dir / LEDGER
        self.best: tuple[float, str] | None = None  # (val loss, checkpoint name)
        self.best_val: float | None = None  # best val loss seen, for save_best
        self.last_val: tuple[int, float] | None = None  # (step, val loss)
        self.saved: set[str] = set()  # checkpoint names this run wrote

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        if self.run.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX):  # a write or removal cut short by a crash
                    shutil.rmtree(p, ignore_errors=True)

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        if event.split == "val" and event.source == "local":
            self.last_val = (event.step, event.loss)

    @hookimpl
    def trainctl_control(self, view: RunView) -> Control | None:
        if not self.config.save_best or self.last_val is None or self.last_val[0] != view.step:
            return None
        val = self.last_val[1]
        if view.state != "running" or (self.best_val is not None and val >= self.best_val):
            return None
        self.best_val = val
        return Control(save=True, reason="best")

    @hookimpl
    def trainctl_write_checkpoint(self, step: int, reason: str, write: Callable[[Path], None]) -> Path | None:
        group = self.run.group
        if group is not None and group.distributed:
            return self._write_together(step, reason, write, group)
        started = time.perf_counter()
        name = f"{PREFIX}{step:06d}"
        final = self.root / name
        tmp = self.root / f"{TMP_PREFIX}{name}-{os.getpid()}"
        previous_best = (self.best, self.best_val)
        # before write(): the plugin state saved inside this checkpoint must already count it
        self._note_best(step, name)
        if name in self.saved and final.is_dir():
            # this run saved this step already and no update happened since: keep it (replacing
            # it would leave a moment with one checkpoint fewer)
            return self._record(step, reason, final, started)
        try:
            self._make(tmp)
            write(tmp)
            seal(tmp, final, step, reason)
        except Exception as exc:  # disk full, permissions, quota: torch and safetensors raise their own types
            shutil.rmtree(tmp, ignore_errors=True)
            self.best, self.best_val = previous_best
            raise self._failure(name, _why(exc)) from exc
        except BaseException:  # e.g. a second Ctrl-C: leave no half-written directory behind
            shutil.rmtree(tmp, ignore_errors=True)
            self.best, self.best_val = previous_best
            raise
        return self._record(step, reason, final, started)

    def _val_at(self, step: int) -> float | None:
        return self.last_val[1] if self.last_val and self.last_val[0] == step else None

    def _note_best(self, step: int, name: str) -> None:
        val = self._val_at(step)
        if val is not None and (self.best is None or val <= self.best[0]):
            self.best = (val, name)
        if val is not None and (self.best_val is None or val < self.best_val):
            self.best_val = val

    def _write_together(self, step: int, reason: str, write: Callable[[Path], None], group: Any) -> Path:
        """Every rank writes its files (rank 0 the weights, each rank its RNG) into the one
        temporary directory rank 0 made; rank 0 seals it (manifest of every rank's files, then
        the rename) once all ranks are done. Every rank makes the same collectives, in the same
        order, whatever fails, so a failure fails every rank with the same message."""
        started = time.perf_counter()
        name = f"{PREFIX}{step:06d}"
        final = self.root / name
        previous_best = (self.best, self.best_val)
        self._note_best(step, name)  # before write(), as in the single-process path
        plan: tuple[str, str] = ("", "")
        if self.run.is_main:
            tmp = self.root / f"{TMP_PREFIX}{name}-{os.getpid()}"
            if name in self.saved and final.is_dir():
                plan = ("keep", "")
            else:
                try:
                    self._make(tmp)
                    plan = ("write", str(tmp))
                except OSError as exc:
                    plan = ("error", _why(exc))
        kind, where = group.broadcast(plan)  # also a barrier: the directory exists for everyone
        if kind == "keep":
            return self._record(step, reason, final, started) if self.run.is_main else final
        if kind == "error":
            self.best, self.best_val = previous_best
            raise self._failure(name, where)
        tmp = Path(where)
        why = ""
        try:
            write(tmp)
        except Exception as exc:
            why = f"rank {self.run.rank}: {_why(exc)}"
        except BaseException:
            if self.run.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        problems = [p for p in group.gather(why) if p]  # every rank's files are in place
        if not problems and self.run.is_main:
            try:
                seal(tmp, final, step, reason)
            except Exception as exc:
                problems = [_why(exc)]
        problems = group.broadcast(problems)  # rank 0's seal, for everyone
        if problems:
            if self.run.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self.best, self.best_val = previous_best
            raise self._failure(name, "; ".join(problems))
        if not self.run.is_main:
            self.saved.add(name)
            return final
        return self._record(step, reason, final, started)

    def _make(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def _failure(self, name: str, why: str) -> CheckpointWriteError:
        intact = [p.name for p in checkpoints(self.root)]
        return CheckpointWriteError(
            f"could not write checkpoint {name} in {self.root}: {why}; "
            f"{'the earlier checkpoint ' + intact[-1] + ' is intact' if intact else 'no earlier checkpoint exists'}. "
            "Free space or fix permissions, then run again to resume"
        )

    def _record(self, step: int, reason: str, final: Path, started: float) -> Path:
        self.saved.add(final.name)
        val = self._val_at(step)
        self._append_ledger({
            "step": step, "path": str(final), "reason": reason, "val_loss": val,
            "manifest_sha256": sha256_file(final / MANIFEST), "seconds": round(time.perf_counter() - started, 4),
            "time": time.time(),
        })
        self._prune()
        return final

    def _append_ledger(self, record: dict[str, Any]) -> None:
        with open_append(self.ledger) as f:  # no symlink followed; a line cut short is ended first
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def _prune(self) -> None:
        keep = self.config.keep_last
        if not keep:
            return
        existing = checkpoints(self.root)
        protected = set(p.name for p in existing[-keep:])
        if self.best is not None:
            protected.add(self.best[1])
        for path in existing:
            if path.name not in protected:
                discard(path)

    @hookimpl
    def trainctl_find_checkpoint(self, resume: str) -> Path | None:
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            problem = verify(path) if path.is_dir() else "not a directory"
            if problem and (path / self.config.dir).is_dir():
                raise ConfigError(f"cannot resume from {path}: it is a run directory, not a checkpoint; "
                                  f"use --out {path} (resumes from its newest checkpoint) or --resume {path / self.config.dir}/step-...")
            if problem:
                raise ConfigError(f"cannot resume from {path}: {problem}; pick another checkpoint or --resume never")
            return path
        for path in reversed(checkpoints(self.root)):
            problem = verify(path)
            if problem is None:
                return path
            message = f"checkpoint {path.name} is corrupt ({problem}); trying the previous one"
            print(f"trainctl: {message}", file=sys.stderr)
            self.run.emit(Notice(step=step_of(path), kind=notices.CHECKPOINT_CORRUPT, message=message,
                                 data={"path": str(path), "problem": problem}, time=time.time()))
        return None

    @hookimpl
    def trainctl_state_dict(self) -> dict[str, Any]:
        return {"checkpoint": {"best": list(self.best) if self.best else None, "best_val": self.best_val}}

    @hookimpl
    def trainctl_load_state_dict(self, states: dict[str, Any]) -> None:
        mine = states.get("checkpoint", {})
        best = mine.get("best")
        self.best = (float(best[0]), str(best[1])) if best else None
        self.best_val = mine.get("best_val", self.best[0] if self.best else None)


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"


SPEC = PluginSpec(name="checkpoint", factory=Checkpointer, config=Config, critical=True,
                  description="Atomic checkpoints with sha256 manifests, a ledger, keep-last and resume.")
