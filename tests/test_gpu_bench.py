"""bench/gpu.sh runs for real on the CPU (``--cpu-smoke``): every step, through the real CLI,
with tiny sizes."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env

GPU_SH = ROOT / "bench" / "gpu.sh"
STEPS = ["gpt-ddp", "gpt-fsdp", "hf-qwen3", "ckpt"]


def gpu_sh(*args: str, env: dict[str, str] | None = None, timeout: float = 280) -> subprocess.CompletedProcess:
    full = cli_env() | {"PYTHON": sys.executable} | (env or {})
    return subprocess.run(["bash", str(GPU_SH), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def results(folder: Path) -> dict[str, dict]:
    return {name: json.loads((folder / f"gpu-{name}.json").read_text()) for name in STEPS
            if (folder / f"gpu-{name}.json").exists()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict[str, dict], Path]:
    folder = tmp_path_factory.mktemp("gpu-results")
    # a nominal peak, so that the MFU path runs too (a CPU has no entry in the table)
    proc = gpu_sh("--cpu-smoke", "--results", str(folder), env={"GPU_BENCH_PEAK_TFLOPS": "0.5"})
    return proc, results(folder), folder


def test_smoke_runs_every_step_and_reports_each(smoke):
    proc, found, folder = smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(found) == sorted(STEPS)
    for name in STEPS:
        assert f"gpu-bench: {name}: " in proc.stdout, proc.stdout
    summary = json.loads((folder / "gpu-summary.json").read_text())
    assert summary["smoke"] is True and summary["steps"] == {n: found[n]["status"] for n in STEPS}


def test_gpt_ddp_tokens_per_second_and_mfu(smoke):
    from trainctl.backends.gpt.model import GPT, GPTConfig

    r = smoke[1]["gpt-ddp"]
    assert r["status"] == "ok", r
    assert r["tokens_per_step"] == 4 * 64 and r["tokens_per_s"] > 0
    assert [i["step"] for i in r["intervals"]] == [4, 6]  # the first logged interval is warm-up
    # MFU as the kernel reports it: FLOPs per token x tokens/s over the peak given
    flops = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64, bias=False)).flops_per_token()
    expected = statistics.median(flops * i["tokens_per_s"] / 0.5e12 for i in r["intervals"])
    assert r["peak_tflops"] == 0.5 and r["mfu"] == pytest.approx(expected, rel=1e-3)
    assert "train.parallel=ddp" in r["command"]


def test_gpt_fsdp_tokens_per_second(smoke):
    r = smoke[1]["gpt-fsdp"]
    assert r["status"] == "ok" and r["tokens_per_s"] > 0, r
    assert "train.parallel=fsdp" in r["command"]


def test_hf_qwen3_shaped_run_reports_memory(smoke):
    r = smoke[1]["hf-qwen3"]
    assert r["status"] == "ok", r
    assert r["packing"] == "bfd" and r["sequence"] == 256
    assert r["shape"]["num_key_value_heads"] == 2 and r["shape"]["tie_word_embeddings"] is True
    assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0
    assert r["mfu"] is not None  # the nominal peak reached the in-process run


def test_checkpoint_blocking_sync_and_async(smoke):
    r = smoke[1]["ckpt"]
    sync = r["sync"]
    assert sync["saves_measured"] == 3 and sync["checkpoint_mb"] > 0
    # the time the loop lost agrees with the save the kernel timed (a sync save blocks all of it)
    assert sync["blocked_s_median"] >= 0.7 * statistics.median(sync["save_event_duration_s"])
    assert r["status"] == "ok", r
    # noise can put a near-free async save a hair below zero: the count and a finite ratio are the contract
    assert r["async"]["saves_measured"] == 3 and math.isfinite(r["async_over_sync"])
    assert "plugin.checkpoint.async_save=false" in sync["command"]
    assert "plugin.checkpoint.async_save=true" in r["async"]["command"]


def test_a_failed_step_does_not_stop_the_next(tmp_path):
    proc = gpu_sh("--cpu-smoke", "--only", "gpt-ddp,ckpt", "--results", str(tmp_path),
                  env={"GPU_BENCH_GPT_BATCH": "0"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = results(tmp_path)
    assert sorted(found) == ["ckpt", "gpt-ddp"]
    assert found["gpt-ddp"]["status"] == "failed" and "batch_size" in found["gpt-ddp"]["reason"]
    assert found["ckpt"]["sync"]["saves_measured"] == 3  # ran after the failure
    assert "gpu-bench: gpt-ddp: FAILED" in proc.stdout


def test_a_spent_budget_skips_steps_and_fails(tmp_path):
    proc = gpu_sh("--cpu-smoke", "--only", "gpt-ddp,hf-qwen3", "--results", str(tmp_path), env={"GPU_BENCH_BUDGET_S": "5"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = results(tmp_path)
    assert {n: r["status"] for n, r in found.items()} == {"gpt-ddp": "skipped", "hf-qwen3": "skipped"}
    assert "gpu-bench: gpt-ddp: SKIPPED" in proc.stdout


def test_bad_usage_and_no_gpu_are_one_line_exit_2(tmp_path):
    for args in (["--bogus"], ["--only", "gpt"]):
        proc = gpu_sh(*args, "--results", str(tmp_path))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    import torch

    if not torch.cuda.is_available():
        proc = gpu_sh("--results", str(tmp_path))
        assert proc.returncode == 2 and "--cpu-smoke" in proc.stderr, proc.stderr


def test_peak_table():
    from bench.gpu_common import peak_tflops

    env = os.environ.pop("GPU_BENCH_PEAK_TFLOPS", None)
    try:
        assert peak_tflops("NVIDIA H200") == 989.0
        assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
        assert peak_tflops("NVIDIA H100 PCIe") == 756.0
        assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
        assert peak_tflops("cpu (x86_64, 2 cores)") is None
    finally:
        if env is not None:
            os.environ["GPU_BENCH_PEAK_TFLOPS"] = env


def test_the_gpu_model_is_qwen3_06b_shaped():
    """The full-size config has Qwen3-0.6B's parameter counts (model card: 0.6B, 0.44B
    non-embedding), built on the meta device: no memory, no download."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.gpu_hf import QWEN3_06B, qwen3_config

    class Ids:
        pad_token_id, eos_token_id = 1, 0

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen3_config(QWEN3_06B, Ids()))
    total = sum(p.numel() for p in model.parameters())
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert (total, non_embedding) == (596_049_920, 440_467_456)
    assert model.lm_head.weight is model.model.embed_tokens.weight
