"""The checkpoint plugin: policies, keep-last with the best kept, the ledger, leftovers,
corrupt checkpoints skipped by name, explicit paths verified, write failures."""

from __future__ import annotations

import errno
import json

import pytest

from tests.conftest import TINY_GPT, make_config
from tests.recording_plugins import INSTANCES
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run import Run
from trainctl.kernel.checkpoint_files import MANIFEST, checkpoints, sha256_file, verify


def fake_run(registry, out, *overrides, resume="never", prepare=None):
    session = Run(make_config(registry, out, *overrides), registry, resume=resume)
    if prepare:
        prepare(session.backend)
    return session, session.fit()


def ledger(out) -> list[dict]:
    return [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()]


def test_keep_last_over_20_saves_keeps_the_newest_and_the_best(registry, tmp_path):
    out = tmp_path / "out"
    # val loss is best at step 4, then worse: the best checkpoint must survive keep_last = 3
    vals = {s: (0.5 if s == 4 else 1.0 + s / 100) for s in range(21)}
    _, result = fake_run(registry, out, 'plugins=["checkpoint", "recorder"]', "train.max_steps=20",
                         "train.save_interval=1", "train.eval_interval=2", "plugin.checkpoint.keep_last=3",
                         prepare=lambda b: b.val_losses.update(vals))
    assert result.status == "completed"
    names = [p.name for p in checkpoints(out / "checkpoints")]
    assert names == ["step-000004", "step-000018", "step-000019", "step-000020"]
    assert all(verify(out / "checkpoints" / n) is None for n in names)
    records = ledger(out)
    assert [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        assert {"step", "path", "reason", "val_loss", "manifest_sha256", "time", "seconds"} <= r.keys()
    assert records[3]["val_loss"] == 0.5 and records[2]["val_loss"] is None  # step 3: no eval there
    for name in names:
        record = next(r for r in records if r["path"].endswith(name))
        assert record["manifest_sha256"] == sha256_file(out / "checkpoints" / name / MANIFEST)
    saves = [e for e in INSTANCES["recorder"].events if type(e).__name__ == "CheckpointSaved"]
    assert len(saves) == 20 and all(s.duration > 0 for s in saves)


def test_save_best_saves_after_an_improving_evaluation(registry, tmp_path):
    out = tmp_path / "out"
    vals = {2: 3.0, 4: 2.0, 6: 2.5, 8: 1.0}
    _, result = fake_run(registry, out, 'plugins=["checkpoint", "recorder"]', "train.max_steps=9",
                         "train.eval_interval=2", "plugin.checkpoint.save_best=true",
                         prepare=lambda b: b.val_losses.update(vals))
    assert [(r["step"], r["reason"], r["val_loss"]) for r in ledger(out)] == [
        (2, "best", 3.0), (4, "best", 2.0), (8, "best", 1.0), (9, "end", vals.get(9, 2.0 / 10)),
    ]


def test_leftover_temporary_directories_are_removed_at_start(registry, tmp_path):
    out = tmp_path / "out"
    leftover = out / "checkpoints" / ".tmp-step-000009-4242"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    fake_run(registry, out, 'plugins=["checkpoint"]', "train.max_steps=2")
    assert not leftover.exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def test_corrupt_newest_checkpoints_are_reported_by_name_and_skipped(registry, tmp_path, capfd):
    out = tmp_path / "out"
    fast = [*TINY_GPT, "train.threads=1", "train.max_steps=4", "train.save_interval=1", "plugin.lr.warmup_steps=1"]
    first = Run(make_config(registry, out, *fast, backend="gpt"), registry, resume="never")
    assert first.fit().step == 4
    root = out / "checkpoints"
    weights = root / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    optimizer = root / "step-000003" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped
    optimizer.write_bytes(bytes(data))
    capfd.readouterr()

    plugins = 'plugins=["lr", "checkpoint", "recorder"]'
    session = Run(make_config(registry, out, *fast, "train.max_steps=5", plugins, backend="gpt"), registry, resume="auto")
    assert session.resumed_from.endswith("step-000002") and session.state.step == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "trainctl: checkpoint step-000004 is corrupt (model.safetensors does not match its sha256); trying the previous one",
        "trainctl: checkpoint step-000003 is corrupt (optimizer.pt does not match its sha256); trying the previous one",
    ]
    session.fit()
    notices = [e for e in INSTANCES["recorder"].events if type(e).__name__ == "Notice" and e.kind == "checkpoint_corrupt"]
    assert [(n.step, n.data["path"].rsplit("/", 1)[-1]) for n in notices] == [(4, "step-000004"), (3, "step-000003")]
    # the corrupt step-000003 and step-000004 were replaced by good ones as training went on
    assert all(verify(p) is None for p in checkpoints(root))

    with pytest.raises(ConfigError, match="cannot resume from .*step-000001.*model.safetensors is missing"):
        (root / "step-000001" / "model.safetensors").unlink()
        Run(make_config(registry, out, *fast, backend="gpt"), registry, resume=str(root / "step-000001"))
    with pytest.raises(ConfigError, match="it is a run directory, not a checkpoint; use --out"):
        Run(make_config(registry, tmp_path / "other", *fast, backend="gpt"), registry, resume=str(out))


def test_a_failed_write_fails_the_run_and_keeps_the_previous_checkpoint(registry, tmp_path):
    out = tmp_path / "out"
    session = Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=10", "train.save_interval=1"),
                  registry, resume="never")
    save = session.backend.save

    def disk_full_at_step_4(directory):
        save(directory)  # the first file is written, then the disk is full
        if session.state.step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")

    session.backend.save = disk_full_at_step_4
    result = session.fit()
    assert result.status == "failed" and result.step == 4
    assert "plugin 'checkpoint' failed" in result.reason
    assert "could not write checkpoint step-000004" in result.reason and "No space left on device" in result.reason
    assert "the earlier checkpoint step-000003 is intact" in result.reason
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002", "step-000003"]  # no temporary left
    assert all(verify(p) is None for p in checkpoints(root))


def test_lines_cut_by_a_kill_stay_on_their_own_line(registry, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints.jsonl").write_text('{"step": 1, "path": "x"}\n{"step": 2, "pa')  # killed mid-append
    (out / "events.jsonl").write_text('{"event": "run_start"}\n{"event": "st')
    fake_run(registry, out, 'plugins=["checkpoint", "jsonl"]', "train.max_steps=2")
    for name in ("checkpoints.jsonl", "events.jsonl"):
        lines = (out / name).read_text().splitlines()
        broken = [line for line in lines if not line.endswith("}")]
        assert len(broken) == 1 and all(json.loads(line) for line in lines if line not in broken)
    assert ledger_steps(out) == [1, 2]


def ledger_steps(out) -> list[int]:
    steps = []
    for line in (out / "checkpoints.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def test_best_inside_a_checkpoint_counts_that_checkpoint(registry, tmp_path):
    """The plugin state saved in a checkpoint already knows that checkpoint is the best."""
    import json

    from tests.conftest import make_config
    from trainctl.kernel.run import Run

    config = make_config(registry, tmp_path / "out", 'plugins=["checkpoint"]', "train.max_steps=4",
                         "train.eval_interval=2", "train.save_interval=2")
    assert Run(config, registry, resume="never").fit().status == "completed"
    for step in (2, 4):
        states = json.loads((tmp_path / "out" / "checkpoints" / f"step-{step:06d}" / "plugins.json").read_text())
        assert states["checkpoint"]["best"][1] == f"step-{step:06d}"  # the fake val loss falls every step


def test_a_failed_seal_or_an_interrupt_rolls_back_the_same_way(registry, tmp_path, monkeypatch):
    """The one rollback: a seal that fails (rank 0's part) and a Ctrl-C inside the write both
    leave no temporary directory and the previous checkpoint newest."""
    import trainctl.plugins.checkpoint as plugin

    out = tmp_path / "sealed"
    sealed = plugin.seal

    def seal_fails_at_step_3(tmp, final, step, reason):
        if step == 3:
            raise OSError(errno.EIO, "Input/output error")
        sealed(tmp, final, step, reason)

    monkeypatch.setattr(plugin, "seal", seal_fails_at_step_3)
    _, result = fake_run(registry, out, 'plugins=["checkpoint"]', "train.max_steps=5", "train.save_interval=1")
    assert result.status == "failed" and "could not write checkpoint step-000003" in result.reason
    assert "Input/output error; the earlier checkpoint step-000002 is intact" in result.reason
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    monkeypatch.undo()

    out = tmp_path / "interrupted"
    session = Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=5", "train.save_interval=1"),
                  registry, resume="never")
    save = session.backend.save

    def interrupted_at_step_3(directory):
        save(directory)
        if session.state.step == 3:
            raise KeyboardInterrupt

    session.backend.save = interrupted_at_step_3
    result = session.fit()
    assert (result.status, result.reason, result.step) == ("stopped", "interrupted", 3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert ledger_steps(out) == [1, 2]


def test_an_evaluation_whose_step_is_not_saved_never_becomes_the_best(registry, tmp_path):
    """Best follows evaluations, but only a written checkpoint can be the best: the val loss of
    step 4 (no checkpoint there) is the lowest, yet step-000006 is the best one kept."""
    out = tmp_path / "out"
    vals = {2: 1.0, 4: 0.5, 6: 0.8, 8: 0.9, 9: 5.0}
    _, result = fake_run(registry, out, 'plugins=["checkpoint"]', "train.max_steps=9", "train.eval_interval=2",
                         "train.save_interval=3", "plugin.checkpoint.keep_last=1",
                         prepare=lambda b: b.val_losses.update(vals))
    assert result.status == "completed"
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-000006", "step-000009"]
    for name in ("step-000006", "step-000009"):
        states = json.loads((out / "checkpoints" / name / "plugins.json").read_text())["checkpoint"]
        assert states["best"] == [0.8, "step-000006"] and states["best_val"] == 0.5
    # step 9 is saved by the interval before the final evaluation: no val loss at its save
    assert [(r["step"], r["val_loss"]) for r in ledger(out)] == [(3, None), (6, 0.8), (9, None)]
