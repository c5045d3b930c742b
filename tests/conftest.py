from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import fake_backend, fault_plugins, recording_plugins
from tests.hf_fixtures import hf  # noqa: F401  (session fixture: tiny HF model and data)
from tests.mixture_data import mixture_sources  # noqa: F401  (session fixture: prepared datasets to mix)
from trainctl.kernel import config as cfg
from trainctl.kernel.registry import Registry

ROOT = Path(__file__).resolve().parent.parent

# A baby GPT small enough to train a few dozen steps in seconds on 2 cores.
TINY_GPT = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.batch_size=8", "train.device='cpu'", "optim.lr=3e-3",
]


@pytest.fixture(scope="session")
def registry() -> Registry:
    registry = Registry.discover(entry_points=False)
    registry.add_module(fake_backend, source="tests")
    registry.add_module(recording_plugins, source="tests")
    registry.add_module(fault_plugins, source="tests")
    return registry


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> Path:
    """The corpus the package embeds, as a text file: tests need nothing outside the repository."""
    from trainctl.backends.gpt.data import embedded_text

    path = tmp_path_factory.mktemp("corpus") / "tinyshakespeare.txt"
    path.write_text(embedded_text(), encoding="utf-8")
    return path


def make_config(registry: Registry, out: Path, *overrides: str, backend: str = "fake"):
    return cfg.load(None, registry, overrides=list(overrides), backend=backend, out_dir=str(out))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("TRAINCTL_TRACE_HOOKS", None)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (``python -m trainctl``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainctl", *args], cwd=cwd or ROOT, env=cli_env(),
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"trainctl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
