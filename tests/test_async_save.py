"""Async saves (``[plugin.checkpoint] async_save = true``), for real: the loop waits only while
the state is copied to memory; the files, their hashes, the seal, the ledger and CheckpointSaved
follow from a background thread; one save at a time; SIGTERM waits for the save in flight, under
DDP and FSDP. (A kill -9 during the background write: tests/test_sharded_checkpoint.py.)"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests import fake_backend
from tests.conftest import make_config, run_cli
from tests.live import FAST, LiveRun, sets
from tests.test_distributed import LONG, TORCHRUN
from trainctl.hooks import BackendSpec, hookimpl
from trainctl.kernel import staging
from trainctl.kernel.checkpoint_files import checkpoints, verify
from trainctl.kernel.registry import Registry
from trainctl.kernel.run import Run

# a model big enough that writing takes longer than copying (4 x 128: ~1 M parameters)
BIGGER = [*FAST, "model.n_layer=4", "model.n_embd=128", "model.n_head=4", "train.max_steps=4",
          "train.save_interval=1", "train.eval_interval=3", "train.log_interval=1"]


def run(out: Path, *overrides: str) -> tuple[list[dict], list[dict]]:
    run_cli("run", "--yes", "--out", str(out), *sets(*BIGGER, *overrides), check=True)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    ledger = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()]
    return events, ledger


def test_async_saves_write_what_sync_saves_write_and_block_only_for_staging(tmp_path):
    sync_events, sync_ledger = run(tmp_path / "sync")
    events, ledger = run(tmp_path / "async", "plugin.checkpoint.async_save=true")

    # the same checkpoints, byte for byte where bytes are deterministic
    names = [p.name for p in checkpoints(tmp_path / "async" / "checkpoints")]
    assert names == [p.name for p in checkpoints(tmp_path / "sync" / "checkpoints")] == [f"step-{s:06d}" for s in range(1, 5)]
    for name in names:
        a, s = tmp_path / "async" / "checkpoints" / name, tmp_path / "sync" / "checkpoints" / name
        assert verify(a) is None
        for file in ("model.safetensors", "optimizer.pt", "rng-rank0.pt", "plugins.json"):
            assert (a / file).read_bytes() == (s / file).read_bytes(), (name, file)

    # one ledger line and one CheckpointSaved per checkpoint, each announced once complete
    assert [(r["step"], r["reason"]) for r in ledger] == [(r["step"], r["reason"]) for r in sync_ledger]
    saves = [e for e in events if e["event"] == "save"]
    assert [e["step"] for e in saves] == list(range(1, 5))
    assert [e["val_loss"] for e in saves] == [e["val_loss"] for e in sync_events if e["event"] == "save"]
    assert saves[2]["val_loss"] is not None  # step 3 was evaluated before its save
    assert all(verify(Path(e["path"])) is None for e in saves)
    # at most one save in flight: each began (after waiting for the previous) once the previous ended
    for before, after in zip(ledger, ledger[1:]):
        assert after["time"] - after["seconds"] >= before["time"] - 0.01, (before, after)

    # the loop waited for the copy only: well under what the synchronous write took
    blocked = sum(r["blocked_seconds"] for r in ledger)
    written = sum(r["seconds"] for r in sync_ledger)
    print(f"loop blocked {blocked:.3f} s by async saves vs {written:.3f} s by sync saves")
    assert all(r["blocked_seconds"] <= r["seconds"] for r in ledger)
    assert blocked < written


@pytest.mark.parametrize("launcher", ["ddp", "fsdp"])
def test_sigterm_waits_for_the_async_save(tmp_path, launcher):
    live = LiveRun(tmp_path / "run", *LONG, "train.grad_accum=2", "train.save_interval=3", f"train.parallel='{launcher}'",
                   "plugin.checkpoint.async_save=true", model=[], launcher=TORCHRUN)
    try:
        live.wait(lambda s: s["state"] == "running" and s["step"] >= 4, timeout=120)
        live.proc.send_signal(signal.SIGTERM)
        live.proc.wait(60)
        status = live.status()
        assert (status["state"], status["reason"]) == ("stopped", "signal"), live.output()
        ledger = live.ledger()
        assert ledger[-1]["reason"] == "signal" and ledger[-1]["step"] == status["step"]
        assert [r["step"] for r in ledger] == sorted({r["step"] for r in ledger})  # each once
        final = Path(ledger[-1]["path"])
        assert verify(final) is None and checkpoints(final.parent)[-1] == final
        assert not list(final.parent.glob(".tmp-*"))
        saved = [(e["step"], e["reason"]) for e in live.events() if e["event"] == "save"]
        assert saved == [(r["step"], r["reason"]) for r in ledger]  # the last one delivered before run_end
        assert [e["event"] for e in live.events()][-1] == "run_end"
        layout = set(json.loads((final / "manifest.json").read_text())["files"])
        assert ("__1_0.distcp" in layout) == (launcher == "fsdp") and ("model.safetensors" in layout) == (launcher == "ddp")
    finally:
        live.close()


class SlowSaveBackend(fake_backend.FakeBackend):
    """Its checkpoint's deferred write takes half a second: still in flight when the run ends."""

    def save(self, directory: Path) -> None:
        deferred = staging.pending()
        if deferred is None:
            return super().save(directory)
        deferred.append(lambda group: (time.sleep(0.5), super(SlowSaveBackend, self).save(directory)))


class SlowSave:
    @hookimpl
    def trainctl_register_backends(self, register) -> None:
        register(BackendSpec(name="slow_save", factory="tests.test_async_save:SlowSaveBackend",
                             model_config=fake_backend.FakeModelConfig, data_config=fake_backend.FakeDataConfig,
                             description="a fake backend whose async save is slow"))


def test_the_async_save_the_last_save_waited_for_is_announced_before_it(tmp_path):
    registry = Registry.discover(entry_points=False)
    registry.add_module(SlowSave(), source="tests")
    out = tmp_path / "out"
    config = make_config(registry, out, 'plugins=["checkpoint", "jsonl"]', "train.max_steps=3", "train.save_interval=2",
                         "plugin.checkpoint.async_save=true", backend="slow_save")
    assert Run(config, registry, resume="never").fit().status == "completed"
    log = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    ledger = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reason"]) for r in ledger] == [(2, "interval"), (3, "end")]
    assert "blocked_seconds" in ledger[0] and "blocked_seconds" not in ledger[1]  # the last one: synchronous
    assert [(e["step"], e["reason"]) for e in log if e["event"] == "save"] == [(2, "interval"), (3, "end")]
