"""End to end: the real CLI in a subprocess trains the gpt backend on tiny-shakespeare."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, TINY_GPT, cli_env, run_cli


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_train_sample_and_events(tmp_path, shakespeare):
    data = tmp_path / "data"
    run_cli("prepare", str(shakespeare), "--out", str(data), check=True)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and meta["train_tokens"] == 1003854 and meta["val_tokens"] == 111540

    out = tmp_path / "run"
    proc = run_cli(
        "run", "--yes", "--out", str(out),
        *sets(*TINY_GPT, f"data.path='{data}'", "train.max_steps=60", "train.log_interval=10",
              "train.eval_interval=30", "train.eval_steps=4", "plugin.lr.warmup_steps=5"),
        check=True,
    )
    assert "plan: GPT 2x32" in proc.stdout
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert events[-1]["status"] == "completed" and events[-1]["step"] == 60
    steps = [e for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == [10, 20, 30, 40, 50, 60]
    for s in steps:
        assert {"loss", "lr", "tokens", "step_time", "grad_norm"} <= s.keys()
    assert steps[-1]["tokens"] == 60 * 8 * 32
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3  # it learns
    evals = [(e["step"], e["split"]) for e in events if e["event"] == "eval"]
    assert evals == [(30, "train"), (30, "val"), (60, "train"), (60, "val")]
    saves = [e for e in events if e["event"] == "save"]
    assert saves and saves[-1]["step"] == 60 and (out / "checkpoints" / "step-000060" / "manifest.json").exists()

    again = run_cli("run", "--yes", "--out", str(out), *sets(*TINY_GPT, f"data.path='{data}'",
                    "train.max_steps=60", "plugin.lr.warmup_steps=5"), check=True)
    assert "already finished 60 steps" in again.stdout

    sample = run_cli("sample", str(out), "--max-new-tokens", "80", "--prompt", "ROMEO:", check=True)
    text = sample.stdout
    assert text.startswith("ROMEO:") and len(text) > 80
    assert set(text) <= set(meta["chars"])


def test_default_run_uses_the_embedded_corpus(tmp_path):
    proc = run_cli("run", "--dry-run", "--out", str(tmp_path / "o"), check=True)
    assert "embedded:tinyshakespeare" in proc.stdout and "GPT 4x128" in proc.stdout
    assert "dry run" in proc.stdout


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from trainctl.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['plugins'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "lr" in proc.stdout and "checkpoint" in proc.stdout


def test_config_show_resolves_defaults(tmp_path):
    proc = run_cli("config", "show", str(ROOT / "configs" / "shakespeare_char.toml"), "--set", "train.max_steps=7", check=True)
    import tomllib

    resolved = tomllib.loads(proc.stdout)
    assert resolved["train"]["max_steps"] == 7
    assert resolved["model"]["n_layer"] == 4 and resolved["optim"]["lr"] == 1e-3
    assert resolved["plugin"]["lr"]["schedule"] == "cosine"
    assert resolved["train"]["grad_clip"] == 1.0  # a default, filled in
    assert resolved["plugins"] == ["lr", "controller", "checkpoint", "status", "console", "jsonl"]


def test_plugins_and_backends_listing():
    proc = run_cli("plugins", check=True)
    for name in ("lr", "console", "jsonl", "checkpoint", "z_loss"):
        assert name in proc.stdout
    assert "builtin" in proc.stdout
    backends = run_cli("backends", check=True)
    assert backends.stdout.startswith("gpt")
