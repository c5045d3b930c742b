"""Resuming safely, through the real CLI: locked keys (and --force), a checkpoint that does not
verify, a pickle with code in it, and a full disk while saving."""

from __future__ import annotations

import json
import pickle
import resource
import signal
import subprocess
import sys

from tests.conftest import ROOT, cli_env, run_cli
from tests.live import FAST, sets
from trainctl.kernel.checkpoint_files import MANIFEST, TMP_PREFIX, checkpoints, sha256_file, verify


def train(out, *overrides, extra=(), **kw):
    return run_cli("run", "--yes", "--out", str(out), *extra, *sets(*FAST, "train.save_interval=3", "train.eval_steps=2", *overrides), **kw)


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resume_refusals_force_full_disk_and_malicious_pickle(tmp_path, shakespeare):
    out = tmp_path / "run"
    root = out / "checkpoints"
    train(out, "train.max_steps=6", check=True)
    assert [p.name for p in checkpoints(root)] == ["step-000003", "step-000006"]

    # a locked key changed: refused with the difference, before any training
    data = tmp_path / "data"
    run_cli("prepare", str(shakespeare), "--out", str(data), check=True)
    line = one_error_line(train(out, "train.max_steps=9", f"data.path='{data}'"))
    assert line == (
        f"trainctl: error: cannot resume from {root / 'step-000006'}: locked keys differ "
        f"(data.path: '' -> '{data}'); restore them, start over with --resume never, or pass --force"
    )
    # ... and accepted with --force (same vocabulary, so the model fits)
    forced = train(out, "train.max_steps=9", f"data.path='{data}'", extra=["--force"], check=True)
    assert f"resume at step 6 from {root / 'step-000006'}" in forced.stdout
    assert [p.name for p in checkpoints(root)][-1] == "step-000009"

    # a full disk while saving: the run fails with a clear error, the previous checkpoint intact
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # like a nearly full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process

    args = ["run", "--yes", "--out", str(out), *sets(*FAST, "train.save_interval=3", "train.eval_steps=2",
                                                       "train.max_steps=12", f"data.path='{data}'")]
    full = subprocess.run([sys.executable, "-m", "trainctl", *args], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=120, preexec_fn=small_files)
    assert full.returncode == 1, full.stdout + full.stderr
    assert (f"trainctl: run failed at step 12: plugin 'checkpoint' failed in trainctl_write_checkpoint: "
            f"CheckpointWriteError: could not write checkpoint step-000012 in {root}") in full.stderr
    assert "the earlier checkpoint step-000009 is intact" in full.stderr and "Traceback" not in full.stderr
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000006", "step-000009"]
    assert all(verify(p) is None for p in checkpoints(root))
    assert json.loads((out / "status.json").read_text())["state"] == "failed"

    # a checkpoint whose manifest verifies but whose optimizer.pt is a pickle with code in it
    marker = tmp_path / "PWNED"
    newest = root / "step-000009"
    (newest / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Payload(str(marker))}))
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["files"]["optimizer.pt"] = sha256_file(newest / "optimizer.pt")
    (newest / MANIFEST).write_text(json.dumps(manifest))
    assert verify(newest) is None
    line = one_error_line(train(out, "train.max_steps=12", f"data.path='{data}'"))
    assert line.startswith(f"trainctl: error: refused to load {newest / 'optimizer.pt'}: it holds more than tensors and plain values")
    assert not marker.exists()  # the payload never ran

    # an explicit checkpoint that does not verify
    older = root / "step-000003"
    (older / "rng-rank0.pt").write_bytes(b"truncated")
    line = one_error_line(train(out, "train.max_steps=12", f"data.path='{data}'", extra=["--resume", str(older)]))
    assert line == (f"trainctl: error: cannot resume from {older}: rng-rank0.pt does not match its sha256; "
                    "pick another checkpoint or --resume never")
    assert not [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_force_over_a_changed_shape_is_one_clear_error(registry, tmp_path):
    import pytest

    from tests.conftest import make_config
    from trainctl.kernel.errors import ConfigError
    from trainctl.kernel.run import Run

    out = tmp_path / "out"
    first = Run(make_config(registry, out, *FAST, "train.max_steps=3", 'plugins=["lr", "checkpoint"]', backend="gpt"),
                registry, resume="never")
    first.fit()
    wider = make_config(registry, out, *FAST, "train.max_steps=4", "model.n_embd=64", 'plugins=["lr", "checkpoint"]', backend="gpt")
    with pytest.raises(ConfigError, match=r"locked keys differ \(model.n_embd: 32 -> 64\)"):
        Run(wider, registry, resume="auto")
    with pytest.raises(ConfigError, match=r"cannot load checkpoint .*step-000003 into this run \(RuntimeError: size mismatch for "):
        Run(wider, registry, resume="auto", force=True)
