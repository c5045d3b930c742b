"""Checkpoints: one directory per checkpoint, complete or absent.

Layout::

    OUT/checkpoints/step-000500/   model.safetensors, optimizer.pt, rng.pt, kernel.json, ...,
                                   manifest.json (sha256 of every other file; written last)
    OUT/checkpoints.jsonl          the ledger: one line per checkpoint written

A checkpoint is written into a temporary directory, every file fsynced, the manifest written
last, then the directory renamed into place: a directory without a verified manifest is not a
checkpoint. Leftover temporary directories are removed when a run starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl.hooks import PluginSpec, RunInfo, hookimpl
from trainctl.hooks.events import EvalEnd
from trainctl.kernel.errors import ConfigError

MANIFEST = "manifest.json"
LEDGER = "checkpoints.jsonl"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    dir: str = "checkpoints"  # relative to the out dir
    keep_last: int = 0  # keep the newest K checkpoints (and the best); 0 = keep all

    def __post_init__(self) -> None:
        if self.keep_last < 0:
            raise ValueError("keep_last must be 0 (keep all) or more")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (incomplete)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    for name, expected in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != expected:
            return f"{name} does not match its sha256"
    return None


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


class Checkpointer:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config = config
        self.run = run
        self.root = run.out_dir / config.dir
        self.ledger = run.out_dir / LEDGER
        self.best: tuple[float, str] | None = None  # (val loss, checkpoint name)
        self.last_val: tuple[int, float] | None = None  # (step, val loss)
        if run.is_main:
            self._clean_leftovers()

    def _clean_leftovers(self) -> None:
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        if event.split == "val" and event.source == "local":
            self.last_val = (event.step, event.loss)

    @hookimpl
    def trainctl_write_checkpoint(self, step: int, reason: str, write: Callable[[Path], None]) -> Path | None:
        name = f"{PREFIX}{step:06d}"
        final = self.root / name
        tmp = self.root / f"{TMP_PREFIX}{name}-{os.getpid()}"
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            for file in files:
                fsync_path(tmp / file)
            manifest = {"step": step, "reason": reason, "files": files, "time": time.time()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            fsync_path(tmp / MANIFEST)
            fsync_path(tmp)
            if final.exists():  # the same step saved again (e.g. resumed, then saved): replace
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        val = self.last_val[1] if self.last_val and self.last_val[0] == step else None
        if val is not None and (self.best is None or val < self.best[0]):
            self.best = (val, name)
        self._append_ledger({
            "step": step, "path": str(final), "reason": reason, "val_loss": val,
            "manifest_sha256": sha256_file(final / MANIFEST), "time": time.time(),
        })
        self._prune()
        return final

    def _append_ledger(self, record: dict[str, Any]) -> None:
        with open(self.ledger, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
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
                shutil.rmtree(path, ignore_errors=True)

    @hookimpl
    def trainctl_find_checkpoint(self, resume: str) -> Path | None:
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            problem = verify(path) if path.is_dir() else "not a directory"
            if problem:
                raise ConfigError(f"cannot resume from {path}: {problem}; pick another checkpoint or --resume never")
            return path
        for path in reversed(checkpoints(self.root)):
            problem = verify(path)
            if problem is None:
                return path
            print(f"trainctl: skipping checkpoint {path}: {problem}", file=sys.stderr)
        return None

    @hookimpl
    def trainctl_state_dict(self) -> dict[str, Any]:
        return {"checkpoint": {"best": list(self.best) if self.best else None}}

    @hookimpl
    def trainctl_load_state_dict(self, states: dict[str, Any]) -> None:
        best = states.get("checkpoint", {}).get("best")
        self.best = (float(best[0]), str(best[1])) if best else None


SPEC = PluginSpec(name="checkpoint", factory=Checkpointer, config=Config, critical=True,
                  description="Atomic checkpoints with sha256 manifests, a ledger, keep-last and resume.")
