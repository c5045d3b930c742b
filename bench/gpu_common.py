"""What the steps of ``bench/gpu.sh`` share: the GPU's bf16 peak, the real CLI in a subprocess,
``events.jsonl`` readers, and one JSON result file per step.

Exit codes of every ``bench/gpu_*.py``: 0 measured, 1 failed. ``gpu.sh`` reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OK, FAILED = 0, 1

# Dense bf16 tensor-core peak (TFLOPS, no sparsity) from NVIDIA's data sheets, matched in order
# against torch.cuda.get_device_name(): the first substring found wins.
BF16_PEAK_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # H200 SXM and GH200: the H100 SXM's compute with more memory
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("A100", 312.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of ``device_name``; ``GPU_BENCH_PEAK_TFLOPS`` overrides; None: unknown."""
    if os.environ.get("GPU_BENCH_PEAK_TFLOPS"):
        return float(os.environ["GPU_BENCH_PEAK_TFLOPS"])
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def device_name() -> str:
    """``torch.cuda.get_device_name()``, or ``cpu (...)`` without a GPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def cli_env() -> dict[str, str]:
    """The checkout's trainctl first on the path; nothing may reach the network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CI="1")
    return env


@dataclass(slots=True)
class Cli:
    """``python -m trainctl ARGS`` in a subprocess."""

    args: list[str]

    def run(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "trainctl", *self.args]
        try:
            return subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"trainctl {self.args[0]} did not finish within {timeout:.0f} s") from None

    def command(self) -> str:
        return shlex.join(["python", "-m", "trainctl", *self.args])


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_end(events: list[dict[str, Any]]) -> dict[str, Any]:
    ends = [e for e in events if e["event"] == "run_end"]
    return ends[-1] if ends else {"status": "missing", "reason": "no run_end event"}


def rates(events: list[dict[str, Any]], skip: int) -> dict[str, Any]:
    """Medians of the logged intervals after the first ``skip`` (compile and allocator warm-up)."""
    logged = [e for e in events if e["event"] == "step" and e.get("tokens_per_s") is not None]
    kept = logged[skip:]
    if not kept:
        raise RuntimeError(f"only {len(logged)} logged steps, {skip} skipped as warm-up: nothing measured")
    mfus = [e["mfu"] for e in kept if e.get("mfu") is not None]
    return {
        "tokens_per_s": statistics.median(e["tokens_per_s"] for e in kept),
        "mfu": statistics.median(mfus) if mfus else None,
        "step_time_s": statistics.median(e["mean_step_time"] for e in kept),
        "intervals": [{"step": e["step"], "tokens_per_s": round(e["tokens_per_s"], 1), "mfu": e.get("mfu")} for e in kept],
        "warmup_intervals_skipped": skip,
    }


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


def write_result(results: Path, name: str, payload: dict[str, Any]) -> Path:
    """``results/gpu-NAME.json``, written whole (temporary file, then rename)."""
    import torch

    results.mkdir(parents=True, exist_ok=True)
    payload = {"step": name, **payload, "torch": torch.__version__, "python": platform.python_version(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = results / f"gpu-{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def say(name: str, text: str) -> None:
    """The step's one result line, the one gpu.sh's reader looks for."""
    print(f"gpu-bench: {name}: {text}", flush=True)


def report(results: Path, name: str, result: dict[str, Any], line: Callable[[dict[str, Any]], str]) -> int:
    """The step's end, the same for every step: its JSON file, its line, its exit code."""
    write_result(results, name, result)
    say(name, line(result))
    return OK if result["status"] == "ok" else FAILED


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options every step takes; a step adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the tests)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    return ap
