"""The requeue signal without SLURM: ``[plugin.controller] requeue_signal`` finishes the step,
saves a committed checkpoint, runs ``scontrol requeue $SLURM_JOB_ID`` (a fake one here, on PATH,
that records its arguments) and exits 75; a failing scontrol is one line; a save in flight is
waited for; two ranks agree; bad values are one-line config errors. On a real SLURM:
tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests import fake_backend
from tests.conftest import make_config, run_cli
from tests.live import LiveRun
from tests.test_distributed import LONG, TORCHRUN, rank_pids
from trainctl.control.requeue import EXIT_REQUEUE
from trainctl.hooks import BackendSpec, hookimpl
from trainctl.kernel import staging
from trainctl.kernel.checkpoint_files import verify
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.registry import Registry
from trainctl.kernel.run import Run

REQUEUE = ["train.max_steps=1000000", "train.log_interval=5", "train.eval_interval=0",
           "plugin.controller.requeue_signal='SIGUSR1'"]
BAR_S = 5.0  # SIGUSR1 to a committed checkpoint and exit, baby GPT (issue 20)


def fake_scontrol(folder: Path, *, exit_code: int = 0) -> Path:
    """An ``scontrol`` that appends its arguments to ``calls`` (and says no when told to)."""
    folder.mkdir(parents=True, exist_ok=True)
    calls = folder / "calls"
    script = folder / "scontrol"
    refuse = f'echo "scontrol: error: Job is not requeueable" >&2; exit {exit_code}' if exit_code else "exit 0"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n{refuse}\n')
    script.chmod(0o755)
    return calls


@pytest.fixture
def slurm_env(tmp_path, monkeypatch):
    """A pretend job 4242 with the fake scontrol first on PATH (the runs inherit os.environ)."""
    def make(exit_code: int = 0) -> Path:
        calls = fake_scontrol(tmp_path / "bin", exit_code=exit_code)
        monkeypatch.setenv("PATH", f"{calls.parent}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        return calls
    return make


@pytest.mark.parametrize("scontrol_exit", [0, 1], ids=["requeued", "scontrol_fails"])
def test_requeue_signal_saves_requeues_and_exits_75(tmp_path, slurm_env, scontrol_exit):
    calls = slurm_env(scontrol_exit)
    run = LiveRun(tmp_path / "run", *REQUEUE)
    try:
        run.wait(lambda s: s["state"] == "running" and s["step"] >= 5)
        sent = time.time()
        run.proc.send_signal(signal.SIGUSR1)
        code = run.exit_code()
        exited = time.time() - sent
        output = run.output()
        assert code == EXIT_REQUEUE, output
        status = run.status()
        assert (status["state"], status["reason"]) == ("stopped", "requeued"), status
        last = run.ledger()[-1]
        assert last["reason"] == "requeued" and last["step"] == status["step"] >= 5
        assert verify(Path(last["path"])) is None  # committed: the manifest verifies
        saved = last["time"] - sent
        print(f"SIGUSR1 -> committed checkpoint in {saved:.2f} s, exit {code} in {exited:.2f} s")
        assert exited <= BAR_S, f"SIGUSR1 to exit took {exited:.2f} s (bar {BAR_S} s)\n{output}"
        assert calls.read_text() == "requeue 4242\n"  # once, with the job id
        said = [e["message"] for e in run.events() if e["event"] == "notice" and e["kind"] == "control"]
        end = run.events()[-1]
        assert (end["event"], end["status"], end["reason"]) == ("run_end", "stopped", "requeued")
        if scontrol_exit == 0:
            assert "requeued SLURM job 4242 (scontrol requeue 4242)" in said
        else:
            line = ("trainctl: scontrol requeue 4242 failed (exit 1): scontrol: error: Job is not requeueable; "
                    "not requeued (exit 75)")
            assert line in output.splitlines(), output
            assert any("failed (exit 1)" in m for m in said)
    finally:
        run.close()


class SignalDuringSaveBackend(fake_backend.FakeBackend):
    """Its asynchronous checkpoint write sends the requeue signal, then takes half a second."""

    def save(self, directory: Path) -> None:
        deferred = staging.pending()
        if deferred is None:
            return super().save(directory)

        def write(group) -> None:
            os.kill(os.getpid(), signal.SIGUSR1)  # handled on the main thread while this save is in flight
            time.sleep(0.5)
            super(SignalDuringSaveBackend, self).save(directory)

        deferred.append(write)


class SignalDuringSave:
    @hookimpl
    def trainctl_register_backends(self, register) -> None:
        register(BackendSpec(name="signal_during_save", factory="tests.test_requeue:SignalDuringSaveBackend",
                             model_config=fake_backend.FakeModelConfig, data_config=fake_backend.FakeDataConfig,
                             description="a fake backend whose async save raises the requeue signal"))


def test_a_requeue_signal_during_an_async_save_waits_for_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # never the real job of a CI runner under SLURM
    registry = Registry.discover(entry_points=False)
    registry.add_module(SignalDuringSave(), source="tests")
    out = tmp_path / "out"
    config = make_config(registry, out, 'plugins=["controller", "checkpoint", "jsonl"]', "train.max_steps=100000",
                         "train.save_interval=10", "plugin.checkpoint.async_save=true",
                         "plugin.controller.requeue_signal='SIGUSR1'", backend="signal_during_save")
    before = signal.getsignal(signal.SIGTERM)
    result = Run(config, registry, resume="never").fit()
    assert (result.status, result.reason) == ("stopped", "requeued")
    ledger = [(r["step"], r["reason"]) for r in _lines(out / "checkpoints.jsonl")]
    assert ledger[0] == (10, "interval") and ledger[-1] == (result.step, "requeued") and result.step > 10, ledger
    assert all(verify(out / "checkpoints" / f"step-{step:06d}") is None for step, _ in ledger)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert signal.getsignal(signal.SIGTERM) is before  # not under SLURM: handlers restored as always


def test_two_ranks_agree_on_a_requeue_signal_sent_to_one(tmp_path, slurm_env):
    calls = slurm_env()
    run = LiveRun(tmp_path / "run", *LONG, "train.grad_accum=2", "plugin.controller.requeue_signal='SIGUSR1'",
                  model=[], launcher=TORCHRUN)
    try:
        status = run.wait(lambda s: s["state"] == "running" and s["step"] >= 5, timeout=120)
        [rank1] = [p for p in rank_pids(run.proc.pid) if p != status["pid"]]
        os.kill(rank1, signal.SIGUSR1)  # rank 1 alone: rank 0 learns it from the agreement
        run.proc.wait(60)
        status = run.status()
        assert (status["state"], status["reason"]) == ("stopped", "requeued"), run.output()
        [saved] = [r for r in run.ledger() if r["reason"] == "requeued"]
        assert saved["step"] == status["step"] and verify(Path(saved["path"])) is None
        assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in Path(saved["path"]).iterdir()}
        assert calls.read_text() == "requeue 4242\n"  # rank 0 only
        assert f"exitcode  : {EXIT_REQUEUE}" in run.output()  # both ranks exited 75 (torchrun's report)
    finally:
        run.close()


@pytest.mark.parametrize("value, expected", [
    ("'USR1'", "requeue_signal must be one of 'SIGUSR1', 'SIGUSR2', 'SIGTERM' or \"\" (none), not 'USR1' (did you mean 'SIGUSR1'?)"),
    ("'SIGKILL'", "not 'SIGKILL'"),
])
def test_a_bad_requeue_signal_is_a_one_line_config_error(registry, tmp_path, value, expected):
    with pytest.raises(ConfigError, match="requeue_signal") as caught:
        make_config(registry, tmp_path / "out", f"plugin.controller.requeue_signal={value}")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_requeue_signal_exits_2(tmp_path):
    proc = run_cli("run", "--out", str(tmp_path / "out"), "--set", "plugin.controller.requeue_signal='USR1'",
                   "--set", "plugin.controller.signals=false")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("trainctl: error: ") and "requeue_signal" in line


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]

