"""Signals against a real `trainctl run`: SIGTERM while training and while evaluating saves and
stops; a second SIGINT aborts at once without leaving a half-written checkpoint; SIGUSR1 saves.
Handlers are installed at run start, chained to earlier handlers, and restored at the end."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import make_config
from tests.live import LiveRun
from tests.recording_plugins import INSTANCES
from trainctl.kernel.run import Run
from trainctl.kernel.checkpoint_files import TMP_PREFIX, checkpoints, verify

LONG = ["train.max_steps=1000000", "train.log_interval=5"]


@pytest.fixture
def live(tmp_path):
    runs = []

    def start(*overrides, **kw):
        run = LiveRun(tmp_path / f"run{len(runs)}", *overrides, **kw)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def assert_stopped_with_signal_checkpoint(run: LiveRun, step_at_least: int) -> dict:
    status = run.status()
    assert status["state"] == "stopped" and status["reason"] == "signal", status
    last = run.ledger()[-1]
    assert last["reason"] == "signal" and last["step"] == status["step"] >= step_at_least
    assert verify(run.out / "checkpoints" / f"step-{last['step']:06d}") is None
    return status


def test_sigterm_while_training_saves_and_stops(live):
    run = live(*LONG, "train.eval_interval=0")
    run.wait(lambda s: s["state"] == "running" and s["step"] >= 5)
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.exit_code() == 0, run.output()
    elapsed = time.monotonic() - sent
    assert elapsed < 25, f"SIGTERM to exit took {elapsed:.1f} s"
    print(f"SIGTERM while training -> saved and exited in {elapsed:.2f} s")
    assert_stopped_with_signal_checkpoint(run, 5)
    notices = [e for e in run.events() if e["event"] == "notice" and e["kind"] == "control"]
    assert any("SIGTERM" in n["message"] for n in notices)


def test_sigterm_during_evaluation_finishes_it_then_saves_and_stops(live):
    run = live(*LONG, "train.eval_interval=20", "train.eval_steps=1500")
    status = run.wait(lambda s: s["state"] == "evaluating")
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.exit_code() == 0, run.output()
    elapsed = time.monotonic() - sent
    assert elapsed < 25, f"SIGTERM to exit took {elapsed:.1f} s"
    print(f"SIGTERM during evaluation -> saved and exited in {elapsed:.2f} s")
    final = assert_stopped_with_signal_checkpoint(run, status["step"])
    assert final["step"] == status["step"]  # no further step after the evaluation
    evals = [e for e in run.events() if e["event"] == "eval" and e["step"] == status["step"]]
    assert {e["split"] for e in evals} == {"train", "val"}  # the evaluation completed


def test_second_sigint_aborts_at_once_without_a_partial_checkpoint(live):
    # a model whose checkpoint (~360 MB) takes a while to write: interrupt twice during it
    big = ["model.n_layer=6", "model.n_head=4", "model.n_embd=640", "model.block_size=16",
           "train.batch_size=2", "train.device='cpu'", "train.threads=1", "plugin.lr.warmup_steps=2"]
    run = live(*LONG, "train.eval_interval=0", "train.save_interval=2", model=big)
    status = run.wait(lambda s: s["state"] == "saving" and s["step"] >= 4, poll=0.005)
    run.proc.send_signal(signal.SIGINT)
    # two signals that arrive while the interpreter is inside one C call count as one: send the
    # second once the first was handled (its message is printed at once)
    deadline = time.monotonic() + 10
    while "stopping after this step and saving" not in run.output() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert run.status()["state"] == "saving", "the save ended before the first interrupt was handled"
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    code = run.exit_code()
    elapsed = time.monotonic() - sent
    output = run.output()
    assert code == 130, output
    assert "second interrupt: aborting now" in output
    assert elapsed < 10
    root = run.out / "checkpoints"
    names = [p.name for p in root.iterdir()]
    assert not [n for n in names if n.startswith(TMP_PREFIX)], names  # the partial write was removed
    assert f"step-{status['step']:06d}" not in names  # the interrupted save never appeared
    assert all(verify(p) is None for p in checkpoints(root)) and checkpoints(root)
    final = run.status()
    assert final["state"] == "stopped" and final["reason"] == "interrupted"


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, signum, frame):
        self.calls.append(signum)


def test_handlers_chain_and_are_restored(registry, tmp_path):
    mine = _Recorder()
    original_usr1 = signal.signal(signal.SIGUSR1, mine)
    original_term = signal.getsignal(signal.SIGTERM)
    try:
        config = make_config(registry, tmp_path / "out", 'plugins=["controller", "checkpoint", "recorder"]',
                             "train.max_steps=50")
        session = Run(config, registry, resume="never")
        assert signal.getsignal(signal.SIGUSR1) is mine  # nothing installed before the run starts
        train_step = session.backend.train_step

        def step(n):
            if n == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            if n == 6:
                os.kill(os.getpid(), signal.SIGTERM)
            return train_step(n)

        session.backend.train_step = step
        result = session.fit()
        assert result.status == "stopped" and result.step == 7 and result.reason == "signal"
        assert mine.calls == [signal.SIGUSR1]  # chained to the handler that was there
        saves = [(e.step, e.reason) for e in INSTANCES["recorder"].events if type(e).__name__ == "CheckpointSaved"]
        assert saves == [(4, "signal"), (7, "signal")]
        assert signal.getsignal(signal.SIGUSR1) is mine and signal.getsignal(signal.SIGTERM) is original_term
    finally:
        signal.signal(signal.SIGUSR1, original_usr1)
