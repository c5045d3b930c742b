"""An ``hf`` checkpoint through ``trainctl eval`` and the eval worker: its files (weights,
tokenizer, optimizer) are verified and copied like any checkpoint's, and the model directory its
config names must lie under the worker's roots."""

from __future__ import annotations

import json

from tests.conftest import ROOT, run_cli
from tests.worker_process import Worker


def test_hf_checkpoint_evaluated_locally_and_remotely_with_its_model_confined(hf, tmp_path):
    out = hf.root / "run-eval"  # beside the tiny model, tokenizer and data: one root holds them all
    sets = [f"model.name_or_path={hf.llama}", f"data.train={hf.messages}", "train.max_steps=2",
            "plugin.lr.warmup_steps=1", "train.log_interval=2", "train.eval_interval=0", "train.save_interval=2"]
    run_cli("run", "--backend", "hf", str(ROOT / "configs" / "hf_tiny.toml"), "--yes", "--out", str(out),
            *[arg for s in sets for arg in ("--set", s)], check=True)
    ckpt = out / "checkpoints" / "step-000002"
    local = json.loads(run_cli("eval", str(ckpt), "--json", check=True).stdout)
    assert local["backend"] == "hf" and local["val_loss"] > 0

    whole = Worker(tmp_path / "state-whole", [hf.root]).start()
    try:
        status, job, _ = whole.request("POST", "/jobs", {"run": "hf", "checkpoint": str(ckpt), "step": 2})
        assert status == 201, job
        done = whole.wait_job(job["id"], timeout=240)
        assert done["status"] == "done", done
        assert done["result"]["val_loss"] == local["val_loss"]  # the same evaluation, exactly
    finally:
        whole.stop()

    only_runs = Worker(tmp_path / "state-runs", [out]).start()  # the model is outside this root
    try:
        job = only_runs.request("POST", "/jobs", {"run": "hf", "checkpoint": str(ckpt), "step": 2})[1]
        done = only_runs.wait_job(job["id"], timeout=240)
        assert done["status"] == "error" and f"names model.name_or_path = '{hf.llama}'" in done["error"], done
        assert "outside the worker's roots" in done["error"]
    finally:
        only_runs.stop()
