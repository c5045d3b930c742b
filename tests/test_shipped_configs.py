"""Every config in configs/ keeps a run safe: SIGTERM (a preemption) saves a checkpoint and stops,
`trainctl ctl` reaches the run and `trainctl status` shows it. Each shipped config runs for real
in the CLI, as shipped (its plugins list untouched) except for a tiny model, local data and an
endless step count; one at a time, since runs started together only spin while waiting."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_GPT, run_cli
from tests.hf_assets import write_jsonl
from tests.live import LiveRun
from tests.test_hf_dpo_cli import preference_rows
from trainctl.kernel.checkpoint_files import verify

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))
ENDLESS = ["train.max_steps=1000000", "train.eval_interval=0", "train.save_interval=0", "train.threads=1",
           "train.log_interval=1"]
GPT = [*TINY_GPT, "model.vocab_size=0", "model.dropout=0.0", "data.path=''", "train.grad_accum=1",
       "train.compile=false", "plugin.lr.warmup_steps=2"]


def overrides(name: str, hf) -> list[str]:
    """The least that turns a shipped config into a seconds-per-step CPU run."""
    if name == "hf_grpo.toml":  # prompts with answers for its rewards; 4 short completions each
        data = write_jsonl(hf.root / "prompts.jsonl", [{"prompt": p, "answer": a} for p, a in
                                                       (("The sky is", "blue"), ("Grass is", "green"))] * 4)
        return [*hf.sets(data), "train.grad_accum=2", "hf.grpo.num_generations=4", "hf.grpo.max_completion_length=4",
                "plugin.lr.warmup_steps=2", *ENDLESS]
    if name.startswith("hf_"):
        data = write_jsonl(hf.root / "pairs.jsonl", preference_rows()) if name == "hf_dpo.toml" else None
        return [*hf.sets(data), "train.grad_accum=2", "data.val_fraction=0.1", "plugin.lr.warmup_steps=2", *ENDLESS]
    return [*GPT, *ENDLESS]


@pytest.fixture
def runs(hf, tmp_path):
    started = {}

    def start(name: str) -> LiveRun:
        started[name] = LiveRun(tmp_path / Path(name).stem, model=overrides(name, hf), args=[str(ROOT / "configs" / name)])
        return started[name]

    yield start
    for run in started.values():
        run.close()


def test_every_config_is_checked():
    assert set(CONFIGS) >= {"shakespeare_char.toml", "gpt2_small.toml", "hf_sft.toml", "hf_tiny.toml", "hf_grpo.toml"}


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_answers_status_ctl_and_saves_on_sigterm(runs, name):
    run = runs(name)
    run.wait(lambda s: s["state"] == "running" and s["step"] >= 2, timeout=120)

    status = run_cli("status", str(run.out), timeout=60)
    assert status.returncode == 0 and "running" in status.stdout, status.stdout + status.stderr
    saved = run_cli("ctl", str(run.out), "save", timeout=60)
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert [e["reason"] for e in run.ledger()] == ["request"], run.ledger()  # ctl save

    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.exit_code(timeout=60) == 0, run.output()
    print(f"{name}: SIGTERM to exit {time.monotonic() - sent:.2f} s")
    final = run.status()
    assert final["state"] == "stopped" and final["reason"] == "signal", final
    last = run.ledger()[-1]
    assert last["reason"] == "signal" and last["step"] == final["step"]
    assert verify(run.out / "checkpoints" / f"step-{last['step']:06d}") is None
    assert "trainctl: warning" not in run.output(), run.output()  # no safety warning for a shipped config
