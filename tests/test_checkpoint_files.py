"""The reading rules every checkpoint reader shares (resume, ``sample``, ``eval``, the worker):
plain names, regular files, no links, the kernel's files listed, and a snapshot that is exactly
the bytes that were verified. Fast: a hand-made checkpoint, no training."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from trainctl.kernel.checkpoint_files import NotVerified, open_checkpoint, snapshot, verify


def make(directory, files: dict[str, bytes], listed=None):
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    manifest = {"step": 3, "files": {n: digests.get(n, "0" * 64) for n in (listed if listed is not None else files)}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


FILES = {"config.toml": b"seed = 1\n", "kernel.json": b"{}", "model.safetensors": b"weights"}


def within(seconds, fn, *args):
    """fn(*args), or a failure if it blocks (a FIFO opened without O_NONBLOCK would, forever)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"{fn.__name__} blocked for {seconds}s"
    return out[0]


def test_an_intact_checkpoint_verifies_and_snapshots_byte_for_byte(tmp_path):
    ckpt = make(tmp_path / "c", FILES)
    assert verify(ckpt) is None
    fd = open_checkpoint(ckpt)
    try:
        manifest = snapshot(fd, tmp_path / "copy")
    finally:
        os.close(fd)
    assert manifest["step"] == 3 and oct((tmp_path / "copy").stat().st_mode & 0o777) == "0o700"
    assert {n: (tmp_path / "copy" / n).read_bytes() for n in FILES} == FILES


@pytest.mark.parametrize("listed, problem", [
    ([], "the manifest does not list config.toml, kernel.json (incomplete)"),
    (["config.toml"], "the manifest does not list kernel.json (incomplete)"),
    ([*FILES, "/etc/hostname"], "the manifest lists '/etc/hostname', which is not a plain file name"),
    ([*FILES, "../c/config.toml"], "the manifest lists '../c/config.toml', which is not a plain file name"),
    ([*FILES, ".."], "the manifest lists '..', which is not a plain file name"),
    ([*FILES, "gone.bin"], "gone.bin is missing"),
])
def test_what_a_manifest_may_list(tmp_path, listed, problem):
    assert problem in verify(make(tmp_path / "c", FILES, listed))


def test_links_fifos_and_odd_manifests_are_refused_without_blocking(tmp_path):
    ckpt = make(tmp_path / "c", FILES)
    os.replace(ckpt / "model.safetensors", tmp_path / "elsewhere")
    (ckpt / "model.safetensors").symlink_to(tmp_path / "elsewhere")  # same bytes, same hash
    assert verify(ckpt) == "model.safetensors is a symbolic link; a checkpoint holds only regular files"

    fifo = make(tmp_path / "f", FILES)
    (fifo / "manifest.json").unlink()
    os.mkfifo(fifo / "manifest.json")
    assert within(10, verify, fifo) == "manifest.json is not a regular file; a checkpoint holds only regular files"

    for text, problem in (('{"step": "3", "files": {}}', "unreadable manifest (it must be"),
                          ("[" * 100_000, "unreadable manifest (RecursionError"),
                          ('{"step": 3, "files": {"config.toml": "abc"}}', "sha256 of config.toml is not a sha256")):
        (ckpt / "manifest.json").write_text(text)
        assert problem in verify(ckpt), verify(ckpt)


def test_a_failed_snapshot_leaves_nothing(tmp_path):
    ckpt = make(tmp_path / "c", FILES)
    (ckpt / "model.safetensors").write_bytes(b"tampered")
    fd = open_checkpoint(ckpt)
    try:
        with pytest.raises(NotVerified, match="model.safetensors does not match its sha256"):
            snapshot(fd, tmp_path / "copy")
        with pytest.raises(NotVerified, match="over the limit of 10"):
            snapshot(fd, tmp_path / "copy", max_bytes=10)
    finally:
        os.close(fd)
    assert not (tmp_path / "copy").exists()
