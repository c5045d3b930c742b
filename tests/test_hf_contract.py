"""The product's claim: one plugin set across backends. The same plugins and cadence on ``gpt`` and
``hf`` give the same events; and the real CLI runs ``--backend hf`` in a subprocess, alone and
under the torchrun / accelerate launchers (one process, nothing relaunched)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, TINY_GPT, cli_env, make_config, run_cli
from trainctl.kernel.run import Run

CADENCE = [
    'plugins=["lr", "checkpoint", "script", "jsonl"]', "train.max_steps=6", "train.log_interval=2",
    "train.eval_interval=3", "train.save_interval=4", "train.eval_steps=2", "plugin.lr.warmup_steps=1",
    "plugin.script.save_at=[5]", "plugin.script.eval_at=[2]",
]


def events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_same_plugins_same_events_on_gpt_and_hf(registry, hf, tmp_path):
    sequences = {}
    for backend, extra in (("gpt", TINY_GPT), ("hf", hf.sets(None, "train.log_interval=2"))):
        out = tmp_path / backend
        result = Run(make_config(registry, out, *extra, *CADENCE, backend=backend), registry, resume="never").fit()
        assert result.status == "completed"
        sequences[backend] = [(e["event"], e["step"]) for e in events(out)]
        steps = [e for e in events(out) if e["event"] == "step"]
        assert all({"loss", "lr", "tokens", "step_time", "grad_norm"} <= e.keys() for e in steps)
        assert all(e["loss"] is not None and e["tokens"] > 0 for e in steps)
    assert sequences["gpt"] == sequences["hf"]
    assert sequences["hf"][:4] == [("run_start", 0), ("step", 2), ("eval", 2), ("eval", 2)]
    assert ("save", 4) in sequences["hf"] and ("save", 5) in sequences["hf"] and sequences["hf"][-1] == ("run_end", 6)


def hf_cli_args(hf, out, *extra):
    sets = [f"model.name_or_path={hf.llama}", f"data.train={hf.messages}", "train.max_steps=4",
            "train.log_interval=2", "train.eval_interval=2", *extra]
    return ["run", "--backend", "hf", str(ROOT / "configs" / "hf_tiny.toml"), "--yes", "--out", str(out),
            *[arg for s in sets for arg in ("--set", s)]]


def test_cli_trains_hf_and_resumes(hf, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*hf_cli_args(hf, out), check=True)
    assert "plan: " in proc.stdout and "loss mask: assistant_only" in proc.stdout and "tokens/step" in proc.stdout
    recorded = events(out)
    assert recorded[-1]["event"] == "run_end" and recorded[-1]["status"] == "completed"
    assert [e["step"] for e in recorded if e["event"] == "step"] == [2, 4]
    assert (out / "checkpoints" / "step-000004" / "model.safetensors").is_file()
    # --resume auto (the default) continues from step 4
    again = run_cli(*hf_cli_args(hf, out, "train.max_steps=6"), check=True)
    assert "resume at step 4" in again.stdout
    assert [e["step"] for e in events(out) if e["event"] == "run_start"] == [0, 4]


def test_cli_dry_run_and_missing_model(hf, tmp_path):
    dry = run_cli(*hf_cli_args(hf, tmp_path / "dry"), "--dry-run", check=True)
    assert "dry run" in dry.stdout and "trainable: 139,584 of 139,584" in dry.stdout
    assert not (tmp_path / "dry" / "events.jsonl").exists()
    missing = run_cli(*hf_cli_args(hf, tmp_path / "m", "model.name_or_path=nobody/no-such-model"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "'nobody/no-such-model' is not a local directory and is not in the Hugging Face cache" in missing.stderr


def test_one_process_under_torchrun_and_accelerate(hf, tmp_path):
    launchers = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "trainctl"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainctl"],
    }
    for name, launcher in launchers.items():
        out = tmp_path / name
        proc = subprocess.run([*launcher, *hf_cli_args(hf, out, "train.max_steps=3")], cwd=ROOT, env=cli_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.stdout}\n{proc.stderr}"
        starts = [e for e in events(out) if e["event"] == "run_start"]
        assert len(starts) == 1 and starts[0]["world_size"] == 1, name
        assert events(out)[-1]["status"] == "completed"
