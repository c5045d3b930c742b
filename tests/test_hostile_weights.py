"""Hostile weight and state files in a checkpoint that still verifies (the attacker rewrites the
manifest's hashes): safetensors whose header lies, a pickle that asks for 2^40 bytes, and a
checkpoint swapped between ``trainctl sample``'s check and its load. Each reader answers in one
line, exit 2, never "internal error"."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import run_cli
from tests.test_crafted_checkpoints import rewrite, torch_bytes
from tests.worker_process import TINY, sets, train
from trainctl.kernel.checkpoint_files import checkpoints


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny gpt runs of one shape that learned different weights (seeds)."""
    base = tmp_path_factory.mktemp("weights")
    for name, seed in (("a", 1), ("b", 2)):
        train(base / name, "train.max_steps=4", "train.save_interval=4", "train.eval_interval=0", f"seed={seed}")
    return base / "a", base / "b"


def newest(run: Path) -> Path:
    return checkpoints(run / "checkpoints")[-1]


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(header: dict, data: bytes, length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def lie(change):
    def craft(path: Path) -> bytes:
        header, data = header_of(path)
        name = first(header)
        return change(header, name, data)
    return craft


SAFETENSORS = {
    "a header of 2^40 bytes": lambda p: struct.pack("<Q", 1 << 40) + b"{}",
    "a truncated header": lambda p: p.read_bytes()[:20],
    "overlapping offsets": lie(lambda h, n, d: with_header(
        {**h, **{k: {**v, "data_offsets": [0, v["data_offsets"][1] - v["data_offsets"][0]]} for k, v in h.items() if k != "__metadata__"}}, d)),
    "a wrong dtype": lie(lambda h, n, d: with_header({**h, n: {**h[n], "dtype": "F64"}}, d)),
    "an offset past the end": lie(lambda h, n, d: with_header({**h, n: {**h[n], "data_offsets": [len(d), len(d) + 10 ** 9]}}, d)),
    "truncated data": lie(lambda h, n, d: with_header(h, d[: len(d) // 2])),
}


@pytest.mark.parametrize("case", SAFETENSORS)
def test_hostile_safetensors_are_one_line_for_every_reader(runs, tmp_path, case):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(newest(runs[0]), ckpt)
    rewrite(ckpt, "model.safetensors", SAFETENSORS[case](ckpt / "model.safetensors"))
    (tmp_path / "out").mkdir()
    for args in (["eval", str(ckpt)], ["sample", str(ckpt), "--max-new-tokens", "5"],
                 ["export", str(ckpt), "-o", str(tmp_path / "out" / "export")],
                 ["run", "--yes", "--resume", str(ckpt), "--out", str(tmp_path / "out" / "run"),
                  *sets(*TINY, "train.max_steps=5")]):
        refused = run_cli(*args, timeout=120)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, (case, args, refused.stderr)
        assert "model.safetensors" in lines[0] and "not a readable safetensors file" in lines[0], (case, lines)


class Huge:
    """A pickle whose one instruction asks for 2^40 bytes (bytearray is a weights-only global)."""

    def __reduce__(self):
        return bytearray, (1 << 40,)


def test_a_pickle_asking_for_2_to_the_40_bytes_is_one_line(runs, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(newest(runs[0]), ckpt)
    rewrite(ckpt, "optimizer.pt", torch_bytes({"optimizer": Huge()}))
    refused = run_cli("run", "--yes", "--resume", str(ckpt), "--out", str(tmp_path / "run"), *sets(*TINY, "train.max_steps=5"),
                      timeout=120)
    [line] = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "optimizer.pt" in line and "MemoryError" in line and "internal error" not in line, line


def test_sample_loads_the_bytes_it_verified(runs, tmp_path, monkeypatch):
    """The checkpoint is swapped for another run's right after its hashes are checked: sample must
    still generate from what it checked (it loads a private copy of those bytes)."""
    from trainctl.cli import build_cli
    from trainctl.kernel import checkpoint_files

    ckpt, other = tmp_path / "ckpt", newest(runs[1])
    shutil.copytree(newest(runs[0]), ckpt)
    args = ["sample", str(ckpt), "--max-new-tokens", "40", "--seed", "3"]
    expected = CliRunner().invoke(build_cli(), args, catch_exceptions=False).stdout
    swapped_text = CliRunner().invoke(build_cli(), [*args[:1], str(other), *args[2:]], catch_exceptions=False).stdout
    assert expected != swapped_text  # the two runs' weights say different things

    check = checkpoint_files.check_files

    def check_then_swap(*a, **kw):
        check(*a, **kw)
        shutil.copy(other / "model.safetensors", ckpt / "model.safetensors")
        shutil.copy(other / "manifest.json", ckpt / "manifest.json")

    monkeypatch.setattr(checkpoint_files, "check_files", check_then_swap)
    assert CliRunner().invoke(build_cli(), args, catch_exceptions=False).stdout == expected


def test_hf_weights_that_lie_are_one_line(hf, tmp_path):
    """from_pretrained reading a checkpoint's safetensors: the same one line."""
    steps = [*hf.sets(None, "train.max_steps=1", "train.eval_interval=0", "plugin.lr.warmup_steps=1")]
    run_cli("run", "--yes", "--backend", "hf", "--out", str(tmp_path / "run"), *sets(*steps),
            check=True)
    ckpt = newest(tmp_path / "run")
    rewrite(ckpt, "model.safetensors", SAFETENSORS["an offset past the end"](ckpt / "model.safetensors"))
    for args in (["eval", str(ckpt)], ["sample", str(ckpt), "--max-new-tokens", "3"]):
        refused = run_cli(*args, timeout=180)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("trainctl:")]  # eval reports its data too
        assert refused.returncode == 2 and len(errors) == 1 and "internal error" not in errors[0], (args, refused.stderr)
        assert "deserializing header" in errors[0] and "Traceback" not in refused.stderr, errors  # safetensors' reason
        assert str(ckpt) in errors[0] and "trainctl-" not in errors[0], errors  # the user's path, not a private copy's


def test_torch_tensors_stay_loadable(runs):
    """The readers above refuse lies, not files: a real checkpoint's files load as they are."""
    from trainctl.kernel.safe_load import load_plain, load_safetensors

    ckpt = newest(runs[0])
    assert all(isinstance(t, torch.Tensor) for t in load_safetensors(ckpt / "model.safetensors").values())
    assert "optimizer" in load_plain(ckpt / "optimizer.pt", "cpu")
