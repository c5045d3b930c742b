"""Checkpoints are private wherever ``plugin.checkpoint.dir`` puts them, whatever the umask.

The run directory is made 0700, so checkpoints inside it were out of other users' reach; a
checkpoint folder configured elsewhere (a scratch disk, ``/tmp``) was made 0755 and its files
0644 under the usual umask 022, DCP's shards and ``.metadata`` included: every local user could
read the weights, the optimizer state and the resolved config. Real ``trainctl run``
subprocesses under umask 022, in one process (synchronous and async saves) and on 2 ranks under
torchrun with FSDP (every rank writes its own shard), then every mode under the folder."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.live import sets
from tests.test_distributed import SAME, TORCHRUN, env

SAVES = ["train.max_steps=4", "train.save_interval=2", "train.eval_interval=0"]


def run_under_umask(launcher: list[str], out: Path, folder: Path, *overrides: str) -> None:
    proc = subprocess.run(
        [*launcher, "-m", "trainctl", "run", "--yes", "--out", str(out),
         *sets(*SAME, *SAVES, f"plugin.checkpoint.dir='{folder}'", *overrides)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240, umask=0o022,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def not_private(folder: Path) -> list[str]:
    """Every directory from ``folder`` down that is not 0700 and every file that is not 0600."""
    wrong = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        st = os.lstat(path)
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != want:
            wrong.append(f"{path.relative_to(folder.parent)} {stat.S_IMODE(st.st_mode):o}")
    return wrong


def checkpoint_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("step-*/*")}


@pytest.mark.parametrize("save", ["sync", "async"])
def test_one_process_checkpoints_outside_the_run_directory_are_private(tmp_path, save):
    folder = tmp_path / "scratch" / "ckpts"  # neither it nor its parent exists yet
    run_under_umask([sys.executable], tmp_path / "run", folder, f"plugin.checkpoint.async_save={str(save == 'async').lower()}")
    assert {p.name for p in folder.iterdir()} == {"step-000002", "step-000004"}
    assert {"model.safetensors", "optimizer.pt", "rng-rank0.pt", "config.toml", "manifest.json"} <= checkpoint_files(folder)
    assert not_private(folder) == []


def test_fsdp_shards_outside_the_run_directory_are_private(tmp_path):
    """2 ranks: each writes its DCP shard into rank 0's temporary directory; rank 0 seals."""
    folder = tmp_path / "scratch" / "ckpts"
    run_under_umask(TORCHRUN, tmp_path / "run", folder, "train.parallel='fsdp'", "train.grad_accum=2")
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng-rank0.pt", "rng-rank1.pt"} <= checkpoint_files(folder)
    assert not_private(folder) == []


NOBODY = 65534


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder as another user needs root")
def test_a_folder_planted_after_the_start_is_refused_at_the_first_save(registry, tmp_path):
    """The folder is checked when the run starts (another user's is refused); one that another
    user makes between the start and the first save was written into (and so readable and
    replaceable by them). Now the save finds it there, checks it again and fails in one line."""
    from tests.conftest import make_config
    from trainctl.kernel.run import Run

    folder = tmp_path / "scratch" / "ckpts"
    run = Run(make_config(registry, tmp_path / "run", 'plugins=["checkpoint"]', f"plugin.checkpoint.dir='{folder}'",
                          "train.max_steps=2"), registry)
    folder.mkdir(parents=True)  # the other user's, made while the run sets up
    os.chown(folder, NOBODY, NOBODY)
    result = run.fit()
    assert result.status == "failed"
    assert f"checkpoint directory {folder} belongs to uid {NOBODY}, not you" in result.reason
    assert "\n" not in result.reason and list(folder.iterdir()) == []
