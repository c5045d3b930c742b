"""Exact resume: a run stopped at step 20 and resumed to 40 gives the losses of an uninterrupted
40-step run, bit for bit (CPU), with and without gradient accumulation and with dropout."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_GPT, make_config
from trainctl.kernel.run import Run
from trainctl.plugins.lr import LRSchedule

COMMON = [*TINY_GPT, "train.threads=1", "train.max_steps=40", "train.log_interval=1", "train.eval_interval=10",
          "train.eval_steps=2", "plugin.lr.warmup_steps=5", "plugin.lr.decay_steps=40"]


def losses(out) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if e["event"] == "step"}


def fit(registry, out, *overrides, resume="never"):
    config = make_config(registry, out, *COMMON, *overrides, backend="gpt")
    session = Run(config, registry, resume=resume)
    return session, session.fit()


@pytest.mark.parametrize("extra", [
    ["train.grad_accum=1"],
    ["train.grad_accum=2", "model.dropout=0.1"],
], ids=["plain", "grad_accum2_dropout"])
def test_stop_at_20_and_resume_is_bit_identical(registry, tmp_path, extra):
    plugins = '["lr", "checkpoint", "jsonl"]'
    _, whole = fit(registry, tmp_path / "whole", f"plugins={plugins}", *extra)
    assert whole.status == "completed"

    stopped_plugins = '["lr", "checkpoint", "script", "jsonl"]'
    _, first = fit(registry, tmp_path / "split", f"plugins={stopped_plugins}", "plugin.script.stop_at=[20]", *extra)
    assert first.status == "stopped" and first.step == 20
    session, second = fit(registry, tmp_path / "split", f"plugins={plugins}", *extra, resume="auto")
    assert session.resumed_from.endswith("step-000020") and second.step == 40

    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(expected) == list(range(1, 41)) and sorted(got) == list(range(1, 41))
    assert got == expected  # exact float equality, every step
    ckpt = sorted((tmp_path / "split" / "checkpoints").iterdir())[-1]
    assert (ckpt / "rng-rank0.pt").exists()  # one RNG file per rank


def test_lr_schedule_is_a_pure_function_of_the_step():
    from trainctl.hooks.plugin import RunInfo
    from trainctl.plugins.lr import Config

    run = RunInfo(run_name="r", backend="gpt", out_dir=None, max_steps=100)  # type: ignore[arg-type]
    a = LRSchedule(Config(warmup_steps=10), run)
    b = LRSchedule(Config(warmup_steps=10), run)
    forward = [a.trainctl_lr(step, 1e-3) for step in range(100)]
    backward = [b.trainctl_lr(step, 1e-3) for step in reversed(range(100))][::-1]
    assert forward == backward  # no hidden state: order of calls does not matter
    assert [a.trainctl_lr(s, 1e-3) for s in (50, 20, 50)] == [forward[50], forward[20], forward[50]]
