"""Helpers for remote-evaluation tests: a real ``trainctl eval-worker`` subprocess, JSON over
HTTP on loopback, tiny gpt runs in subprocesses, and checkpoint surgery."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, TINY_GPT, cli_env, run_cli

# One thread: on 2 busy cores, torch's default thread pool spins and makes a 10 ms step take 400 ms.
TINY = [*TINY_GPT, "train.threads=1", "plugin.lr.warmup_steps=2", "train.eval_steps=2"]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train(out: Path, *overrides: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "trainctl", "run", "--yes", "--out", str(out), *sets(*TINY, *overrides)],
        cwd=ROOT, env={**cli_env(), **(env or {})}, capture_output=True, text=True, timeout=240,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"run exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def local_eval(checkpoint: Path) -> dict[str, Any]:
    return json.loads(run_cli("eval", str(checkpoint), "--json", check=True).stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None, *, token: str = "", raw: bytes | None = None,
         timeout: float = 10) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON body, headers) of one request; HTTP errors are answers, not raises."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


class Worker:
    """``trainctl eval-worker`` in a subprocess; ``url`` is read from ``STATE/address``."""

    def __init__(self, state: Path, roots: list[Path], *, token: str = "", port: int = 0,
                 args: tuple[str, ...] = (), max_files: int | None = None) -> None:
        self.state, self.roots, self.token, self.port = state, roots, token, port
        self.args, self.max_files = args, max_files  # extra CLI options; an open-file limit (ulimit -n)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log = state.parent / f"{state.name}.log"

    def start(self, timeout: float = 60) -> Worker:
        (self.state / "address").unlink(missing_ok=True)
        args = [sys.executable, "-m", "trainctl", "eval-worker", "--port", str(self.port), "--state", str(self.state)]
        for root in self.roots:
            args += ["--root", str(root)]
        args += self.args
        env = {**cli_env(), "TRAINCTL_EVAL_TOKEN": self.token}

        def limit_files() -> None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_files, self.max_files))

        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=limit_files if self.max_files else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"eval-worker exited {self.proc.returncode}:\n{self.log.read_text()}")
            address = self.state / "address"
            if address.exists():
                self.url = address.read_text().strip()
                if http("GET", self.url + "/health")[0] == 200:
                    return self
            time.sleep(0.1)
        raise AssertionError(f"eval-worker did not start:\n{self.log.read_text()}")

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        kw.setdefault("token", self.token)
        return http(method, self.url + path, body, **kw)

    def wait_job(self, job_id: str, statuses: tuple[str, ...] = ("done", "error"), timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job, _ = self.request("GET", f"/jobs/{job_id}")
            assert status == 200, job
            if job["status"] in statuses:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} not {statuses} after {timeout}s:\n{self.log.read_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def copy_checkpoint(src: Path, dest: Path, *, eval_steps: int | None = None, **config: str) -> Path:
    """A copy of a checkpoint; with ``eval_steps`` its config asks for that many evaluation
    batches (a slow evaluation), with ``config`` (``"data.path": "'/x'"``) those keys set to those
    TOML values, and its manifest is rewritten so that it still verifies."""
    shutil.copytree(src, dest)
    if eval_steps is not None:
        config["train.eval_steps"] = str(eval_steps)
    if config:
        edit_config(dest, config)
    return dest


def edit_config(checkpoint: Path, values: dict[str, str]) -> None:
    """Set ``section.key`` lines of the checkpoint's config.toml and re-hash it in the manifest."""
    import tomllib

    file = checkpoint / "config.toml"
    lines, section = file.read_text().splitlines(), ""
    for i, line in enumerate(lines):
        key = line.split(" = ")[0]
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line and f"{section}.{key}" in values:
            lines[i] = f"{key} = {values[f'{section}.{key}']}"
    file.write_text("\n".join(lines) + "\n")
    tomllib.loads(file.read_text())
    rehash(checkpoint, "config.toml")


def rehash(checkpoint: Path, *names: str) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in names:
        manifest["files"][name] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
