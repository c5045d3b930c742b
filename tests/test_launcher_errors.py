"""Under a launcher every rank meets the same bad config: the error is printed once (by rank 0),
the other ranks exit 2 quietly (one that outlives rank 0 met an error of its own and names its
rank). Real launchers, 2 ranks on gloo. The launcher forms that the
README documents as working from any directory are run from a directory that is not the
repository: `accelerate launch -m trainctl` and `accelerate launch --no_python trainctl`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import cli_env
from trainctl.cli import RANK_GRACE_S

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
ACCELERATE = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
BAD_KEY = "trainctl: error: unknown key 'train.max_stpes' (did you mean 'max_steps'?)"


def launch(command: list[str], cwd: Path) -> str:
    env = cli_env() | {"OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("trainctl: error:")]


def test_torchrun_prints_a_config_error_once(tmp_path):
    output = launch([*TORCHRUN, "-m", "trainctl", "run", "--yes", "--out", str(tmp_path / "o"),
                     "--set", "train.max_stpes=3", "--set", "train.threads=1"], cwd=tmp_path)
    assert errors(output) == [BAD_KEY], output


def test_torchrun_prints_an_error_found_after_the_ranks_joined_once(tmp_path):
    # the data is checked by the backend, after the process group is up, on both ranks
    missing = tmp_path / "nowhere"
    output = launch([*TORCHRUN, "-m", "trainctl", "run", "--yes", "--out", str(tmp_path / "o"),
                     "--set", f"data.path='{missing}'", "--set", "train.threads=1"], cwd=tmp_path)
    found = errors(output)
    assert len(found) == 1 and "no prepared data" in found[0], output


def test_accelerate_module_form_works_outside_the_repository_and_says_it_once(tmp_path):
    output = launch([*ACCELERATE, "-m", "trainctl", "run", "--yes", "--out", str(tmp_path / "o"),
                     "--set", "train.max_stpes=3"], cwd=tmp_path)
    assert errors(output) == [BAD_KEY], output


def test_accelerate_no_python_form_works_outside_the_repository_and_says_it_once(tmp_path):
    output = launch([*ACCELERATE, "--no_python", "trainctl", "run", "--yes", "--out", str(tmp_path / "o"),
                     "--set", "train.max_stpes=3"], cwd=tmp_path)
    assert errors(output) == [BAD_KEY], output


def test_a_rank_that_outlives_rank_0_says_its_own_error_with_its_rank(tmp_path):
    # no launcher here to end rank 1, as there would be had rank 0 met the same error
    env = cli_env() | {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "trainctl", "run", "--out", str(tmp_path / "o"),
                           "--set", "train.max_stpes=3"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and time.monotonic() - started >= RANK_GRACE_S
    assert proc.stderr.strip().splitlines() == [BAD_KEY.replace("error: ", "error: rank 1: ")]
