"""Crafted DCP ``.metadata``, the attacks performed for real. ``.metadata`` is DCP's plan of which
file holds which piece of a sharded checkpoint, and DCP reads it with ``pickle.load``; trainctl
reads it with torch's weights-only unpickler and checks every field (``backends/dcp_metadata``).

Each payload is sealed into a real sharded checkpoint (FSDP, 2 ranks), so that its manifest
verifies, and handed to every reader: ``eval``, ``export``, ``sample``, ``run --resume`` and a job
that another user submits to the eval worker. No marker file ever appears; the CLI exits 2 with
one line; the worker marks the job failed and keeps serving.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.live import sets
from tests.test_crafted_checkpoints import rewrite
from tests.test_distributed import SAME
from tests.test_sharded_checkpoint import ACCUM, fsdp
from tests.worker_process import Worker
from trainctl.backends import dcp_metadata
from trainctl.kernel.checkpoint_files import MANIFEST, checkpoints, verify
from trainctl.kernel.errors import ConfigError

MODULE = "torch.distributed.checkpoint.metadata"  # the module the old allow-list opened whole


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A real sharded checkpoint (FSDP on 2 ranks), under a directory that stands for a worker's root."""
    root = tmp_path_factory.mktemp("root")
    os.chmod(root, 0o755)
    fsdp(root / "run", "train.max_steps=2", "train.eval_interval=0")
    [ckpt] = checkpoints(root / "run" / "checkpoints")
    return ckpt


def crafted(sharded: Path, dest: Path, metadata: bytes) -> Path:
    """A copy of the checkpoint whose ``.metadata`` is ``metadata``, its manifest rehashed."""
    shutil.copytree(sharded, dest)
    rewrite(dest, ".metadata", metadata)
    assert verify(dest) is None
    return dest


# --- pickles, byte by byte (protocol 2: the one that reaches the weights-only unpickler) -----------

def global_(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def call(module: str, name: str, *args: bytes) -> bytes:
    """``module.name(*args)``: GLOBAL, the arguments as a tuple, REDUCE."""
    return global_(module, name) + b"(" + b"".join(args) + b"tR"


def proto2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def stack_global_4(module: str, name: str, arg: str) -> bytes:
    """Protocol 4's STACK_GLOBAL, which resolves a dotted name with getattr: the audit's payload."""
    def short(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()
    return b"\x80\x04" + short(module) + short(name) + b"\x93" + short(arg) + b"\x85R."


def touch(marker: Path) -> bytes:
    return text(f"touch {marker}")


def payloads(real: bytes, marker: Path) -> dict[str, bytes]:
    """Named payloads, each of which would create ``marker`` if it ran (or exhaust memory)."""
    body = real[2:-1]  # the real metadata's opcodes, between PROTO and STOP
    return {
        "dotted name, protocol 4 (the audit's)": stack_global_4(MODULE, "os.system", f"touch {marker}"),
        "dotted name, protocol 2": proto2(call(MODULE, "os.system", touch(marker))),
        "torch.os.system": proto2(call("torch", "os.system", touch(marker))),
        "os.system": proto2(call("os", "system", touch(marker))),
        "builtins.eval": proto2(call("builtins", "eval", text(f"__import__('os').system('touch {marker}')"))),
        "builtins.getattr": proto2(call("builtins", "getattr", call("builtins", "__import__", text("os")), text("system"))),
        "stealth: run, then the real metadata": proto2(call("os", "system", touch(marker)) + b"0" + body),
        "nested reduce in an allowed class's arguments": proto2(
            global_(MODULE, "StorageMeta") + b"(" + call("os", "system", touch(marker)) + b"tR"),
        "2^40 bytes (bytearray, allowed by torch)": proto2(call("builtins", "bytearray", b"\x8a\x06" + (1 << 40).to_bytes(6, "little"))),
        "a 2^31-byte string that is not there": proto2(b"X" + struct.pack("<I", 1 << 31) + b"abc"),
        "a memo entry that was never stored": proto2(b"j" + struct.pack("<I", 1 << 30)),
        "not a pickle": b"\x00" * 64,
        "empty": b"",
    }


def every_name_of_the_allowed_modules(marker: Path) -> dict[str, bytes]:
    """``module.name("touch marker")`` for every attribute of every module a DCP class lives in
    (and torch's, os's, builtins') that is not one of the classes the reader allows."""
    allowed = {id(c) for c in dcp_metadata.safe_globals()}
    modules = {c.__module__ for c in dcp_metadata.safe_globals()} | {"torch", "torch.serialization", "builtins", "os"}
    out = {}
    for module in sorted(modules):
        for name in dir(sys.modules[module]):
            if id(getattr(sys.modules[module], name, None)) not in allowed:
                out[f"{module}.{name}"] = proto2(call(module, name, touch(marker)))
    return out


def test_no_payload_runs_or_exhausts_the_reader(sharded, tmp_path):
    """In one process, every payload against the reader: refused in one line, nothing runs, each
    within a second (about 3000 payloads)."""
    marker = tmp_path / "pwned"
    real = (sharded / ".metadata").read_bytes()
    battery = {**payloads(real, marker), **every_name_of_the_allowed_modules(marker)}
    assert len(battery) > 1000
    for name, data in battery.items():
        ckpt = tmp_path / "c"
        ckpt.mkdir(exist_ok=True)
        shutil.copy(sharded / MANIFEST, ckpt / MANIFEST)
        (ckpt / ".metadata").write_bytes(data)
        started = time.monotonic()
        with pytest.raises(ConfigError) as refused:
            dcp_metadata.read(ckpt)
        assert time.monotonic() - started < 1.0, name
        assert "\n" not in str(refused.value), (name, str(refused.value))
        assert not marker.exists(), name


def test_every_reader_refuses_the_payloads_through_the_cli(sharded, tmp_path):
    marker = tmp_path / "pwned"
    real = (sharded / ".metadata").read_bytes()
    chosen = payloads(real, marker)
    for i, name in enumerate(["dotted name, protocol 4 (the audit's)", "stealth: run, then the real metadata",
                              "2^40 bytes (bytearray, allowed by torch)"]):
        ckpt = crafted(sharded, tmp_path / f"ckpt{i}", chosen[name])
        (tmp_path / f"out{i}").mkdir()
        for args in readers(ckpt, tmp_path / f"out{i}"):
            refused = run_cli(*args, timeout=120)
            lines = refused.stderr.strip().splitlines()
            assert refused.returncode == 2 and len(lines) == 1, (name, args, refused.stderr)
            assert ".metadata" in lines[0] and "internal error" not in lines[0], (name, lines)
            assert not marker.exists(), (name, args)


def readers(ckpt: Path, out: Path) -> list[list[str]]:
    return [["eval", str(ckpt)], ["export", str(ckpt), "-o", str(out / "export")],
            ["sample", str(ckpt), "--max-new-tokens", "5"],
            ["run", "--yes", "--resume", str(ckpt), "--out", str(out / "run"), *sets(*SAME, ACCUM, "train.max_steps=3")]]


# --- plans that point outside the checkpoint ------------------------------------------------------

def edit_storage(sharded: Path, change) -> bytes:
    """The real metadata with ``change(info)`` applied to the first tensor piece's storage."""
    metadata = dcp_metadata.read(sharded)
    index = next(i for i in metadata.storage_data if i.offset is not None)
    metadata.storage_data[index] = change(metadata.storage_data[index])
    return pickle.dumps(metadata, protocol=dcp_metadata.PROTOCOL)


def other_runs_shard(sharded: Path) -> str:
    return str(sharded / "__0_0.distcp")


PLANS = {
    "an absolute path": (lambda info, d: dataclasses.replace(info, relative_path=other_runs_shard(d)), "not a plain file name"),
    "../": (lambda info, d: dataclasses.replace(info, relative_path=f"../{d.name}/__0_0.distcp"), "not a plain file name"),
    "/dev/zero, 2 GB": (lambda info, d: dataclasses.replace(info, relative_path="/dev/zero", length=2 << 30), "not a plain file name"),
    "a FIFO": (lambda info, d: dataclasses.replace(info, relative_path="fifo.distcp"), "does not list"),
    "a symlink": (lambda info, d: dataclasses.replace(info, relative_path="link.distcp"), "does not list"),
    "an offset past the end": (lambda info, d: dataclasses.replace(info, offset=1 << 40), "are not inside"),
    "a length past the end": (lambda info, d: dataclasses.replace(info, length=(d / "__0_0.distcp").stat().st_size + 1), "are not inside"),
    "a negative offset": (lambda info, d: dataclasses.replace(info, offset=-8), "are not inside"),
    "a storage transform": (lambda info, d: dataclasses.replace(info, transform_descriptors=["zstd"]), "transforms"),
}


@pytest.mark.parametrize("plan", PLANS)
def test_a_plan_that_reads_outside_the_checkpoint_is_refused_before_any_read(sharded, tmp_path, plan):
    change, words = PLANS[plan]
    ckpt = crafted(sharded, tmp_path / "ckpt", edit_storage(sharded, lambda info: change(info, sharded)))
    os.mkfifo(ckpt / "fifo.distcp")  # neither is listed in the manifest, so the checkpoint still verifies
    (ckpt / "link.distcp").symlink_to(sharded / "__0_0.distcp")
    started = time.monotonic()
    refused = run_cli("eval", str(ckpt), timeout=60)
    assert time.monotonic() - started < 30  # the CLI's start-up; the refusal itself reads nothing
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "refused .metadata" in refused.stderr and words in refused.stderr, refused.stderr


# --- the eval worker, with a checkpoint another user crafted and submitted ------------------------

ROOT_USER = os.geteuid() == 0  # CI's: then the attacker is a second user, nobody; otherwise the same one


def as_nobody(script: str, *args: str) -> subprocess.CompletedProcess:
    who = {"user": "nobody", "group": "nogroup"} if ROOT_USER else {}
    python = "/usr/bin/python3" if ROOT_USER else sys.executable  # nobody may not reach the venv
    return subprocess.run([python, "-c", script, *args], cwd="/", capture_output=True, text=True,
                          timeout=60, **who)


SUBMIT = """
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/jobs", method="POST", data=json.dumps(
    {"run": "mine", "checkpoint": sys.argv[2], "step": 2}).encode())
print(json.loads(urllib.request.urlopen(req, timeout=10).read())["id"])
"""


def test_a_worker_job_submitted_by_another_user_runs_nothing_and_the_worker_keeps_serving(sharded, tmp_path):
    root = sharded.parent.parent.parent  # the fixture's root, readable by others
    drop = root / "drop"
    drop.mkdir()
    os.chmod(drop, 0o777)
    marker = drop / "pwned"
    real = (sharded / ".metadata").read_bytes()
    bad = {"dotted": payloads(real, marker)["dotted name, protocol 4 (the audit's)"],
           "stealth": payloads(real, marker)["stealth: run, then the real metadata"],
           "dev-zero": edit_storage(sharded, lambda info: dataclasses.replace(info, relative_path="/dev/zero", length=2 << 30))}
    for name, data in bad.items():  # written by nobody, as an attacker who may write under the root would
        ckpt = crafted(sharded, tmp_path / name, data)
        shutil.copytree(ckpt, drop / name)
        if ROOT_USER:
            subprocess.run(["chown", "-R", "nobody:nogroup", str(drop / name)], check=True)
    worker = Worker(tmp_path / "state", [root]).start()
    try:
        for name in bad:
            submitted = as_nobody(SUBMIT, worker.url, str(drop / name))
            assert submitted.returncode == 0, submitted.stderr
            job = worker.wait_job(submitted.stdout.strip(), timeout=120)
            assert job["status"] == "error" and ".metadata" in job["error"], job
            assert not marker.exists(), name
        submitted = as_nobody(SUBMIT, worker.url, str(sharded))  # and the real checkpoint still evaluates
        job = worker.wait_job(submitted.stdout.strip(), timeout=120)
        assert job["status"] == "done", job
    finally:
        worker.stop()


# --- the reader stays a weights-only one ----------------------------------------------------------

def test_the_reader_allows_classes_only_named_exactly_and_nothing_unpickles_by_itself(sharded):
    """Fails if a module-wide entry or a dotted name is allowed again, or if trainctl grows its own
    unpickler or calls pickle.load again."""
    allowed = dcp_metadata.safe_globals()
    assert allowed and all(isinstance(c, type) and "." not in c.__qualname__ for c in allowed), allowed
    assert all(not isinstance(c, types.ModuleType) for c in allowed)
    package = ROOT / "trainctl"
    for path in package.rglob("*.py"):
        source = path.read_text()
        for banned in ("pickle.load(", "pickle.loads(", "weights_only=False"):
            assert banned not in source, f"{path.relative_to(ROOT)} has {banned}"
        for finder in refusing_finders(ast.parse(source)):
            assert finder, f"{path.relative_to(ROOT)}: a find_class that may resolve a global (use torch's weights-only unpickler)"


def refusing_finders(tree: ast.AST) -> list[bool]:
    """For every ``find_class`` defined in ``tree``: whether it resolves nothing at all (its body
    is one ``raise``, as nanoGPT's meta.pkl reader, which reads plain values only). An allow-list
    of our own is what the audit bypassed with a dotted name."""
    finders = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "find_class"]
    return [[type(statement) for statement in node.body if not isinstance(statement, ast.Expr)] == [ast.Raise]
            for node in finders]  # a docstring, then one raise
    # what trainctl writes is what its reader reads: protocol 2, no writer's path left in it
    assert (sharded / ".metadata").read_bytes()[:2] == b"\x80\x02"
    assert dcp_metadata.read(sharded).storage_meta.checkpoint_id is None
