"""Crafted checkpoints fail cleanly: odd values in kernel.json, plugins.json or an RNG file, and a
manifest that leads to /dev/zero, each in a checkpoint whose manifest still verifies. Through the
real CLI, ``--resume auto`` reports each one by name and resumes from the previous complete one;
``--resume PATH`` is one line and exit 2. No file is read without a bound."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.live import FAST, sets
from trainctl.kernel.checkpoint_files import MANIFEST, sha256_file
from trainctl.kernel.resume import BadCheckpoint, kernel_problem, read_bounded, rng_problem


def rewrite(ckpt, name: str, data: bytes) -> None:
    """Replace a file and its sha256 in the manifest, so the checkpoint still verifies."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = sha256_file(ckpt / name)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def edit_kernel(change):
    def craft(ckpt):
        kernel = json.loads((ckpt / "kernel.json").read_text())
        change(kernel)
        rewrite(ckpt, "kernel.json", json.dumps(kernel).encode())
    return craft


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def manifest_to_dev_zero(ckpt):
    (ckpt / MANIFEST).unlink()
    (ckpt / MANIFEST).symlink_to("/dev/zero")


def manifest_listing_dev_zero(ckpt):
    (ckpt / "zero").symlink_to("/dev/zero")
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"].update({"/dev/zero": "0" * 64, "zero": "0" * 64})
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# newest first: what is done to the checkpoint, and the words its report must hold
CRAFTS = [
    (edit_kernel(lambda k: k["state"].update(step="5")), 'kernel.json: state.step = "5" is not a whole number'),
    (edit_kernel(lambda k: k.pop("state")), "kernel.json: state is missing or not a table"),
    (edit_kernel(lambda k: k["rng"].update(python="garbage")), "kernel.json: rng.python is not a Python random state"),
    (edit_kernel(lambda k: k["rng"]["numpy"][1].__setitem__(3, 1 << 40)), "kernel.json: rng.numpy is not a NumPy random state"),
    (edit_kernel(lambda k: k["state"].update(tokens=10 ** 30)), "kernel.json: state.tokens = 1000000000000000000000000000000 is not"),
    (lambda c: rewrite(c, "kernel.json", (c / "kernel.json").read_bytes().replace(b'"last_loss": ', b'"last_loss": 1e999, "x": ')),
     "kernel.json: state.last_loss = Infinity is not a finite number"),
    (lambda c: rewrite(c, "plugins.json", b'[{"checkpoint": {}}]'), "plugins.json: not a table of plugin states (a JSON list)"),
    (lambda c: rewrite(c, "plugins.json", b'{"checkpoint": {"best": [[["junk"]], {"a": null}]}}'),
     "plugins.json: checkpoint.best is not [val loss, checkpoint name]"),
    (lambda c: rewrite(c, "plugins.json", f'{{"lr": {deep(100_000)}}}'.encode()), "plugins.json is not valid JSON (nested too deeply)"),
    (lambda c: rewrite(c, "rng-rank0.pt", torch_bytes({"cpu": "not a tensor"})),
     "rng-rank0.pt: 'cpu' is not a generator state (a 1-D byte tensor)"),
    (lambda c: rewrite(c, "rng-rank0.pt", torch_bytes({"cpu": torch.zeros(7, dtype=torch.uint8)})),
     "rng-rank0.pt: 'cpu' holds 7 bytes, not the 5056 of a CPU generator state"),
    (manifest_to_dev_zero, "manifest.json is a symbolic link; a checkpoint holds only regular files"),
    (manifest_listing_dev_zero, "zero"),  # "/dev/zero is missing", or refused by name
]


def test_crafted_checkpoints_are_skipped_by_auto_and_refused_by_path(tmp_path):
    out = tmp_path / "run"
    steps = len(CRAFTS) + 2
    common = [*FAST, "plugin.lr.decay_steps=1000", "train.eval_interval=0", "train.eval_steps=1"]
    run_cli("run", "--yes", "--out", str(out), *sets(*common, f"train.max_steps={steps}", "train.save_interval=1"),
            check=True)
    root = out / "checkpoints"
    crafted = []
    for step, (craft, words) in zip(range(steps, 2, -1), CRAFTS):
        ckpt = root / f"step-{step:06d}"
        craft(ckpt)
        crafted.append((ckpt, words))

    # auto: every crafted checkpoint reported by name, newest first; step 2 is used. With
    # max_steps = 2 the run has nothing left to do after resuming, so it ends there.
    started = time.monotonic()
    auto = run_cli("run", "--yes", "--out", str(out), *sets(*common, "train.max_steps=2"), timeout=120)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert time.monotonic() - started < 60  # /dev/zero was not read
    assert "already finished 2 steps" in auto.stdout and "Traceback" not in auto.stderr
    reports = [line for line in auto.stderr.splitlines() if line.startswith("trainctl: checkpoint ")]
    assert len(reports) == len(crafted), auto.stderr
    for line, (ckpt, words) in zip(reports, crafted):
        assert line.startswith(f"trainctl: checkpoint {ckpt.name} is corrupt (") and line.endswith("; trying the previous one")
        assert words in line, line

    # an explicit PATH: one line, exit 2, naming the checkpoint and the problem (the check is the
    # one auto made above: one crafted file of each kind here, to keep the test short)
    for ckpt, words in (crafted[0], crafted[6], crafted[9], crafted[11]):
        proc = run_cli("run", "--yes", "--out", str(out), "--resume", str(ckpt), *sets(*common, f"train.max_steps={steps + 1}"),
                       timeout=120)
        assert proc.returncode == 2, (ckpt.name, proc.stdout, proc.stderr)
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"trainctl: error: cannot resume from {ckpt}: ") and words in line, line
        assert line.endswith("; pick another checkpoint or --resume never") and "Traceback" not in proc.stderr


# --- the checks themselves, in process (fast) ---------------------------------------------------

def good_kernel() -> dict:
    import random

    import numpy as np

    state = np.random.get_state()
    return {
        "format": 1, "state": {"step": 3, "tokens": 96, "last_loss": 2.5, "last_val_loss": None, "best_val_loss": None},
        "locked": {"model.n_layer": 2},
        "rng": {"python": json.loads(json.dumps(random.getstate())),
                "numpy": [state[0], state[1].tolist(), *state[2:]]},
    }


@pytest.mark.parametrize("change, words", [
    (lambda k: k.update(format=True), "format true is not 1"),
    (lambda k: k["state"].update(step=True), "state.step = true"),
    (lambda k: k["state"].update(step=-1), "state.step = -1"),
    (lambda k: k["state"].update(step=1 << 41), "state.step = 2199023255552"),
    (lambda k: k["state"].update(last_val_loss="low"), 'state.last_val_loss = "low" is not a finite number'),
    (lambda k: k.update(locked=["model.n_layer"]), "locked is missing or not a table"),
    (lambda k: k["rng"]["python"][1].pop(), "rng.python"),
    (lambda k: k["rng"]["python"][1].__setitem__(624, 625), "rng.python"),
    (lambda k: k["rng"]["numpy"].__setitem__(0, "PCG64"), "rng.numpy"),
    (lambda k: k["rng"]["numpy"].__setitem__(3, 2), "rng.numpy"),
    (lambda k: k.update(rng=None), "rng is missing or not a table"),
])
def test_kernel_json_checks(change, words):
    kernel = good_kernel()
    assert kernel_problem(kernel) is None
    change(kernel)
    assert words in kernel_problem(kernel)
    assert "not a table (a JSON list)" == kernel_problem([kernel])


def test_rng_file_checks():
    assert rng_problem(torch_bytes({"cpu": torch.get_rng_state()})) is None
    assert rng_problem(torch_bytes([torch.get_rng_state()])) == "not a table with a 'cpu' generator state"
    assert rng_problem(torch_bytes({"cpu": torch.get_rng_state(), "mps": 1})) == "not a table with a 'cpu' generator state"
    assert "generator state" in rng_problem(torch_bytes({"cpu": torch.get_rng_state().float()}))
    assert rng_problem(b"PK\x03\x04 truncated").startswith("not a torch RNG file")


def test_bounded_reads_refuse_devices_fifos_symlinks_and_large_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(tmp_path / "small")
    (tmp_path / "small").write_bytes(b"12345")
    (tmp_path / "large").write_bytes(b"x" * 100)
    assert read_bounded(tmp_path / "small", 5) == b"12345"
    for name, words in [("fifo", "not a regular file"), ("link", "not a regular file"), ("large", "larger than 10 bytes"),
                        ("missing", "is missing")]:
        with pytest.raises(BadCheckpoint, match=words):
            read_bounded(tmp_path / name, 10)
    with pytest.raises(BadCheckpoint, match="not a regular file"):
        read_bounded(Path("/dev/zero"), 10)
