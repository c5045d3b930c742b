"""Checkpoints: one directory per checkpoint, complete or absent (the files and the atomic
seal are in :mod:`trainctl.kernel.checkpoint_files`; this plugin owns when, where and how many).

Layout::

    OUT/checkpoints/step-000500/   the backend's files (gpt: model.safetensors, optimizer.pt,
                                   rng-rank0.pt, model.json, data_meta.json; under FSDP the
                                   weights and optimizer are every rank's DCP shard
                                   __N_0.distcp and .metadata instead), the kernel's
                                   (kernel.json: step = data position, python/numpy RNG, locked
                                   keys; plugins.json; config.toml) and manifest.json (sha256 of
                                   every other file; written last)
    OUT/checkpoints.jsonl          the ledger: one line per checkpoint written

A checkpoint is written into a temporary directory, every file fsynced, the manifest written
last, then the directory renamed into place: a directory without a verified manifest is not a
checkpoint. Old checkpoints are removed only after the new one is in place, and removal renames
them out of the way first, so a kill at any instant leaves only complete checkpoints under
``step-*`` names (and perhaps a ``.tmp-*`` directory, removed when the next run starts).
Checkpoints are private wherever ``dir`` puts them, whatever the umask: the folder (when this
run makes it) and the temporary directory are made 0700, and the seal makes every file in it
0600 before the rename, whoever wrote it (torch, DCP, safetensors).

Policies: every ``train.save_interval`` steps (the kernel's cadence), after an evaluation that
improved the best validation loss (``save_best``), at the end, and on demand (signals, ``trainctl
ctl``); ``keep_last`` keeps the newest K and the best. A write that fails (disk full) fails the
run, leaving the previous checkpoints as they were: this plugin is critical.

One write path, for one process and for many (the process group of one process answers every
collective at once): rank 0 makes the temporary directory and tells the others its name; every
rank writes its own files into it (``rng-rankN.pt``; rank 0 also the weights and the kernel's
files); once all say they are done rank 0 writes the manifest, listing every rank's files, and
renames; then the ledger and pruning (rank 0). A failure anywhere, on any rank, removes the
temporary directory in one place (``_rollback``). The steps are kept apart (begin, fill, seal,
commit) for the asynchronous save (``async_save = true``): on the training thread, begin, then
fill with the big writes deferred (:mod:`trainctl.kernel.staging`: the tensors copied to CPU
memory, all the loop waits for); on the background thread (:mod:`.background_save`, with a
process group of its own), those writes, seal and commit, then ``CheckpointSaved`` through
``run.emit`` (delivered at the next step boundary). One save in flight: the next save, the end of
the run and SIGTERM (which ends it) wait for it; a kill meanwhile leaves a ``.tmp-*`` directory
and the previous checkpoint the newest complete one.

The best checkpoint is followed from evaluation events: a validation loss at least as good as the
best checkpoint's makes that step's checkpoint the candidate, which becomes the best once it is
written (a candidate whose step passes unsaved is dropped). The plugin state inside a checkpoint
is only ever restored from that checkpoint, so it counts the candidate as written.

Resume: ``--resume auto`` takes the newest checkpoint that verifies and whose kernel files pass
the kernel's checks (:mod:`trainctl.kernel.resume`), naming each one it skips. The run directory
must be on storage every rank sees.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import CheckpointSaved, Control, EvalEnd, Notice, RunEnd, RunStart, RunView
from trainctl.kernel.backend import Distributed
from trainctl.kernel import staging
from trainctl.kernel.checkpoint_files import (MANIFEST, PREFIX, PRIVATE_DIR, TMP_PREFIX, checkpoints, discard, seal,
                                              sha256_file, step_of)
from trainctl.kernel.distributed import Group
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.resume import BadCheckpoint, read
from trainctl.kernel.run_dir import check_read_back, open_append
from trainctl.plugins.background_save import Background

LEDGER = "checkpoints.jsonl"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    dir: str = "checkpoints"  # relative to the out dir
    keep_last: int = 0  # keep the newest K checkpoints (and the best); 0 = keep all
    save_best: bool = False  # also save after an evaluation that improved the val loss
    async_save: bool = False  # the loop waits only while the state is copied to memory

    def __post_init__(self) -> None:
        if self.keep_last < 0:
            raise ValueError("keep_last must be 0 (keep all) or more")


class Checkpointer:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config = config
        self.run = run
        self.group: Group = run.group or Group(Distributed())  # a group of one where none is given
        self.root = run.out_dir / config.dir
        check_read_back(self.root, "checkpoint directory", run.out_dir)  # a planted checkpoint would be resumed
        self.ledger = run.out_dir / LEDGER
        self.best: tuple[float, str] | None = None  # (val loss, name) of the best checkpoint written
        self.candidate: tuple[float, str] | None = None  # the best if the latest evaluation's checkpoint is written
        self.ending = False  # the kernel is about to write the run's last checkpoint
        self.best_val: float | None = None  # the lowest val loss evaluated, for save_best
        self.improved_at = -1  # the step whose evaluation lowered best_val
        self.last_val: tuple[int, float] | None = None  # (step, val loss) of the latest evaluation
        self.saved: set[str] = set()  # checkpoint names this run wrote
        self.background = Background(self.group)  # async saves: the thread, the save in flight

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        if self.run.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX):  # a write or removal cut short by a crash
                    shutil.rmtree(p, ignore_errors=True)

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        if event.split != "val" or event.source != "local":
            return
        self.last_val = (event.step, event.loss)
        if self.best is None or event.loss <= self.best[0]:  # ties: the newer checkpoint
            self.candidate = (event.loss, _name(event.step))
        if self.best_val is None or event.loss < self.best_val:
            self.best_val, self.improved_at = event.loss, event.step

    @hookimpl
    def trainctl_control(self, view: RunView) -> Control | None:
        # the last save of a run is written synchronously, async_save or not: the loop waits for
        # it anyway, and a failure of it then fails the run instead of a stderr line after run_end
        self.ending = view.state == "ending"
        if self.config.save_best and view.state == "running" and self.improved_at == view.step:
            return Control(save=True, reason="best")
        return None

    @hookimpl
    def trainctl_write_checkpoint(self, step: int, reason: str, write: Callable[[Path], None]) -> Path | None:
        """begin (rank 0: the temporary directory, or keep the checkpoint this run already wrote
        at this step) -> fill (every rank) -> seal (rank 0) -> commit (the ledger, pruning).
        Every rank makes the same collectives in the same order whatever fails, so a failure
        fails every rank with the same message. Async: fill stages, and the rest runs on the
        background thread; None is returned and CheckpointSaved is emitted once it is done."""
        self.background.wait()  # at most one save in flight: the previous one first (its failure is raised here)
        started = time.perf_counter()
        final = self.root / _name(step)
        if self.candidate and self.candidate[1] != final.name:
            self.candidate = None  # its step passed without a checkpoint: it can never be written now
        kind, where = self.group.broadcast(self._begin(final))  # also a barrier: the directory exists for all
        if kind == "error":
            raise self._failure(final.name, where)
        if kind == "keep" and self.config.async_save:
            return None  # written (and announced) by its own save, which is complete now
        if kind == "write":
            tmp = Path(where)
            try:
                if self.config.async_save and not self.ending:
                    self._start(tmp, final, step, reason, write, started)
                    return None
                self._seal(tmp, final, step, reason, *self._fill(tmp, write), self.group)
            except BaseException:  # any rank's failure, a second Ctrl-C, a lost peer
                self._rollback(tmp)
                raise
        return self._commit(step, reason, final, started, self._val_at(step), self._take_candidate(final.name))

    def _begin(self, final: Path) -> tuple[str, str]:
        """Rank 0's plan: ("write", temporary directory), ("keep", "") or ("error", why)."""
        if not self.run.is_main:
            return ("", "")  # rank 0's answer replaces it
        if final.name in self.saved and final.is_dir():
            # this run saved this step already and no update happened since: keep it (replacing
            # it would leave a moment with one checkpoint fewer)
            return ("keep", "")
        tmp = self.root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
        try:
            self._make_root()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=PRIVATE_DIR)
            os.chmod(tmp, PRIVATE_DIR)  # exactly: nobody else may enter while the files are written
        except ConfigError as exc:
            return ("error", str(exc))
        except OSError as exc:
            return ("error", _why(exc))
        return ("write", str(tmp))

    def _make_root(self) -> None:
        """The checkpoint folder: made 0700 (whatever the umask) when this run creates it, as the
        run directory is; one that exists keeps its mode, and must still pass the check made at
        start (it may have appeared since, made by someone else, if it lies outside the run
        directory). Its parents, if made here, get the usual mode, as the run directory's do."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.root.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            check_read_back(self.root, "checkpoint directory", self.run.out_dir)
            return
        os.chmod(self.root, PRIVATE_DIR)

    def _fill(self, tmp: Path, write: Callable[[Path], None]) -> tuple[str, BaseException | None]:
        """This rank's files (or, staging, their copies in memory): ("", None) or what failed."""
        try:
            write(tmp)
        except Exception as exc:  # disk full, permissions, quota: torch and safetensors raise their own types
            return _why(exc), exc
        return "", None

    def _seal(self, tmp: Path, final: Path, step: int, reason: str, why: str, cause: BaseException | None,
              group: Any) -> None:
        """Once every rank is done (the gather), rank 0 seals; everyone learns how it went."""
        answers = group.gather(why)
        problems = [f"rank {rank}: {p}" if group.distributed else p for rank, p in enumerate(answers) if p]
        if not problems and self.run.is_main:
            try:
                seal(tmp, final, step, reason)
            except Exception as exc:
                problems, cause = [_why(exc)], exc
        problems = group.broadcast(problems)  # rank 0's seal, for everyone
        if problems:
            raise self._failure(final.name, "; ".join(problems)) from cause

    def _rollback(self, tmp: Path) -> None:
        """The one rollback of a write that failed anywhere: its temporary directory goes."""
        if self.run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- async: stage on the training thread, write and seal on the background one ------------

    def _start(self, tmp: Path, final: Path, step: int, reason: str, write: Callable[[Path], None],
               started: float) -> None:
        """Fill with the big writes deferred (their state copied to CPU memory), agree that every
        rank staged, and hand the rest to the background thread."""
        with staging.staging() as writes:
            why, cause = self._fill(tmp, write)
        problems = [p for p in self.group.gather(why) if p]  # every rank starts the background part, or none
        if problems:
            raise self._failure(final.name, "; ".join(problems)) from cause
        val, best = self._val_at(step), self._take_candidate(final.name)
        blocked = time.perf_counter() - started
        self.background.submit(self._finish, tmp, final, step, reason, writes, started, val, best, blocked)

    def _finish(self, tmp: Path, final: Path, step: int, reason: str, writes: list[staging.Write],
                started: float, val: float | None, best: tuple[float, str] | None, blocked: float) -> None:
        try:
            why, cause = "", None
            try:
                for deferred in writes:
                    deferred(self.background.group.pg)
            except Exception as exc:
                why, cause = _why(exc), exc
            self._seal(tmp, final, step, reason, why, cause, self.background.group)
        except BaseException:
            self._rollback(tmp)
            raise
        path = self._commit(step, reason, final, started, val, best, blocked=blocked)
        self.run.emit(CheckpointSaved(step=step, path=str(path), reason=reason, duration=time.perf_counter() - started,
                                      val_loss=val, time=time.time()))

    @hookimpl
    def trainctl_run_end(self, event: RunEnd) -> None:
        """The end of the run (a signal's included) waits for the save in flight."""
        try:
            self.background.wait()
        except Exception as exc:  # the run is over: say so (one line); the earlier checkpoints are intact
            print(f"trainctl: {exc if isinstance(exc, CheckpointWriteError) else _why(exc)}", file=sys.stderr)
        finally:
            self.background.close()

    # --- commit ---------------------------------------------------------------------------------

    def _take_candidate(self, name: str) -> tuple[float, str] | None:
        """The best-checkpoint candidate if it is this checkpoint (it becomes the best once written)."""
        if self.candidate and self.candidate[1] == name:
            taken, self.candidate = self.candidate, None
            return taken
        return None

    def _commit(self, step: int, reason: str, final: Path, started: float, val: float | None,
                best: tuple[float, str] | None, *, blocked: float | None = None) -> Path:
        self.saved.add(final.name)
        if best is not None and (self.best is None or best[0] <= self.best[0]):  # async: a better one may be in
            self.best = best
        if not self.run.is_main:
            return final
        self._append_ledger({
            "step": step, "path": str(final), "reason": reason, "val_loss": val,
            "manifest_sha256": sha256_file(final / MANIFEST), "seconds": round(time.perf_counter() - started, 4),
            "time": time.time(),
        } | ({"blocked_seconds": round(blocked, 4)} if blocked is not None else {}))
        self._prune()
        return final

    def _val_at(self, step: int) -> float | None:
        return self.last_val[1] if self.last_val and self.last_val[0] == step else None

    def _failure(self, name: str, why: str) -> CheckpointWriteError:
        intact = [p.name for p in checkpoints(self.root)]
        return CheckpointWriteError(
            f"could not write checkpoint {name} in {self.root}: {why}; "
            f"{'the earlier checkpoint ' + intact[-1] + ' is intact' if intact else 'no earlier checkpoint exists'}. "
            "Free space or fix permissions, then run again to resume"
        )

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
            problem = self._problem(path) if path.is_dir() else "not a directory"
            if problem and (path / self.config.dir).is_dir():
                raise ConfigError(f"cannot resume from {path}: it is a run directory, not a checkpoint; "
                                  f"use --out {path} (resumes from its newest checkpoint) or --resume {path / self.config.dir}/step-...")
            if problem:
                raise ConfigError(f"cannot resume from {path}: {problem}; pick another checkpoint or --resume never")
            return path
        for path in reversed(checkpoints(self.root)):
            problem = self._problem(path)
            if problem is None:
                return path
            message = f"checkpoint {path.name} is corrupt ({problem}); trying the previous one"
            print(f"trainctl: {message}", file=sys.stderr)
            self.run.emit(Notice(step=step_of(path), kind=notices.CHECKPOINT_CORRUPT, message=message,
                                 data={"path": str(path), "problem": problem}, time=time.time()))
        return None

    def _problem(self, path: Path) -> str | None:
        """What makes ``path`` no checkpoint to resume from: it does not verify, the kernel's
        files fail their checks, or this plugin's own state in it is malformed."""
        try:
            _restored(read(path).plugins)
        except BadCheckpoint as exc:
            return str(exc)
        except ValueError as exc:
            return f"plugins.json: {exc}"
        return None

    @hookimpl
    def trainctl_state_dict(self) -> dict[str, Any]:
        # restored only from the checkpoint it is written into: there, the candidate is written
        best = self.candidate or self.best
        return {"checkpoint": {"best": list(best) if best else None, "best_val": self.best_val}}

    @hookimpl
    def trainctl_load_state_dict(self, states: dict[str, Any]) -> None:
        self.best, self.best_val = _restored(states)


def _restored(states: dict[str, Any]) -> tuple[tuple[float, str] | None, float | None]:
    """(best, best_val) from this plugin's saved state; ValueError says what is malformed."""
    mine = states.get("checkpoint", {})
    if not isinstance(mine, dict):
        raise ValueError("the checkpoint plugin's state is not a table")
    best, best_val = mine.get("best"), mine.get("best_val")
    if best is not None and not (isinstance(best, list) and len(best) == 2 and _number(best[0])
                                 and isinstance(best[1], str) and best[1].startswith(PREFIX) and "/" not in best[1]):
        raise ValueError("checkpoint.best is not [val loss, checkpoint name]")
    if best_val is not None and not _number(best_val):
        raise ValueError("checkpoint.best_val is not a number")
    best = (float(best[0]), best[1]) if best else None
    return best, best_val if "best_val" in mine else (best[0] if best else None)


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"  # one line: it ends up in run_end's reason


SPEC = PluginSpec(name="checkpoint", factory=Checkpointer, config=Config, critical=True,
                  description="Atomic checkpoints with sha256 manifests, a ledger, keep-last and resume.")
