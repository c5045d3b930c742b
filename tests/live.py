"""A real `trainctl run` in a subprocess, and ways to wait on it through its status.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, TINY_GPT, cli_env

FAST = [*TINY_GPT, "train.threads=1", "plugin.lr.warmup_steps=2"]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


class LiveRun:
    def __init__(self, out: Path, *overrides: str, model: list[str] = FAST, launcher: list[str] | None = None,
                 args: list[str] = ()) -> None:
        """``launcher``: what runs ``-m trainctl`` (default this Python; e.g. torchrun)."""
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out.parent / f"{out.name}.log", "w")
        self.proc = subprocess.Popen(
            [*(launcher or [sys.executable]), "-m", "trainctl", "run", "--yes", "--out", str(out), *args,
             *sets(*model, *overrides)],
            cwd=ROOT, env=cli_env(), stdout=self.log, stderr=subprocess.STDOUT, text=True,
            start_new_session=launcher is not None,  # its own process group: close() ends the ranks too
        )
        self.group = launcher is not None

    def status(self) -> dict:
        try:
            return json.loads((self.out / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait(self, predicate, timeout: float = 90, poll: float = 0.02) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status and predicate(status):
                return status
            if self.proc.poll() is not None:
                raise AssertionError(f"the run exited ({self.proc.returncode}) while waiting:\n{self.output()}")
            time.sleep(poll)
        raise AssertionError(f"timed out waiting; last status {self.status()}\n{self.output()}")

    def exit_code(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        self.log.flush()
        return (self.out.parent / f"{self.out.name}.log").read_text()

    def events(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "events.jsonl").read_text().splitlines()]

    def ledger(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "checkpoints.jsonl").read_text().splitlines()]

    def close(self) -> None:
        if self.group:  # the launcher and its ranks, by the process group this run started
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
