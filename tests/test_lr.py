"""Each schedule, point by point, against values worked out by hand."""

from __future__ import annotations

import pytest

from trainctl.plugins.lr import constant, cosine, inverse_sqrt, linear, wsd

KW = dict(lr=1e-3, warmup=100, decay_steps=2000, min_lr=1e-4)


@pytest.mark.parametrize("fn", [cosine, linear, constant, wsd, inverse_sqrt])
def test_warmup_is_linear_from_the_first_step(fn):
    assert fn(0, **KW) == pytest.approx(1e-3 / 101)
    assert fn(49, **KW) == pytest.approx(1e-3 * 50 / 101)
    assert fn(99, **KW) == pytest.approx(1e-3 * 100 / 101)


@pytest.mark.parametrize(("step", "want"), [(100, 1e-3), (1050, 5.5e-4), (2000, 1e-4), (2001, 1e-4), (5000, 1e-4)])
def test_cosine_is_nanogpts_get_lr(step, want):
    assert cosine(step, **KW) == pytest.approx(want)


def test_cosine_quarter_point():
    # ratio 0.25: min + 0.5 * (1 + cos(pi/4)) * (lr - min)
    assert cosine(575, **KW) == pytest.approx(1e-4 + 0.5 * (1 + 2**-0.5) * 9e-4)


@pytest.mark.parametrize(("step", "want"), [(100, 1e-3), (1050, 5.5e-4), (2000, 1e-4), (3000, 1e-4)])
def test_linear(step, want):
    assert linear(step, **KW) == pytest.approx(want)


@pytest.mark.parametrize("step", [100, 1000, 10**6])
def test_constant(step):
    assert constant(step, **KW) == pytest.approx(1e-3)


@pytest.mark.parametrize(("step", "want"), [(100, 1e-3), (1599, 1e-3), (1600, 1e-3), (1800, 5.5e-4), (2000, 1e-4), (2500, 1e-4)])
def test_warmup_stable_decay(step, want):
    assert wsd(step, **KW) == pytest.approx(want)


def test_wsd_decay_fraction():
    assert wsd(1000, **KW, decay_fraction=0.5) == pytest.approx(1e-3)
    assert wsd(1500, **KW, decay_fraction=0.5) == pytest.approx(5.5e-4)


@pytest.mark.parametrize(("step", "want"), [(99, 1e-3 * 100 / 101), (100, 1e-3 * (100 / 101) ** 0.5), (399, 5e-4), (9999, 1e-4)])
def test_inverse_sqrt(step, want):
    assert inverse_sqrt(step, **KW) == pytest.approx(want)


def test_inverse_sqrt_floors_at_min_lr():
    assert inverse_sqrt(10**7, **KW) == pytest.approx(1e-4)


# --- transformers' schedules, warmup_ratio, and a warmup longer than the run ---------------------

HF_CASES = [
    ("linear", {}), ("cosine", {}), ("cosine", {"num_cycles": 0.25}), ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-5}), ("constant", {}), ("constant_with_warmup", {}),
    ("inverse_sqrt", {}), ("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("cosine_warmup_with_min_lr", {"min_lr": 1e-4}),
    ("warmup_stable_decay", {"num_decay_steps": 12, "decay_type": "1-sqrt", "min_lr_ratio": 0.05}),
]


def plugin(total, **config):
    from pathlib import Path

    from trainctl.hooks import RunInfo
    from trainctl.plugins.lr import Config, LRSchedule

    return LRSchedule(Config(**config), RunInfo(run_name="t", backend="fake", out_dir=Path("."), max_steps=total))


@pytest.mark.parametrize(("name", "kwargs"), HF_CASES)
@pytest.mark.parametrize("warmup", [0, 7])
def test_transformers_schedules_match_get_scheduler_at_every_step(name, kwargs, warmup):
    import torch
    from transformers import get_scheduler

    total, peak = 50, 3e-3
    ours = plugin(total, schedule=name, family="transformers", warmup_steps=warmup, hf_kwargs=kwargs)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=kwargs)
    for step in range(total + 5):  # the update a Trainer makes at `step` uses this lr
        assert ours.trainctl_lr(step, peak) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_warmup_ratio_is_rounded_up_as_training_arguments_does():
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", warmup_steps=0.07, report_to=[])
    assert plugin(50, warmup_ratio=0.07).warmup == args.get_warmup_steps(50) == 4
    s = plugin(50, schedule="linear", family="transformers", warmup_ratio=0.07)
    assert s.trainctl_lr(0, 1.0) == 0.0 and s.trainctl_lr(2, 1.0) == pytest.approx(0.5)


def test_schedule_names_and_kwargs_are_checked():
    from trainctl.kernel.errors import ConfigError
    from trainctl.plugins.lr import Config

    assert plugin(50, schedule="cosine_with_min_lr", hf_kwargs={"min_lr_rate": 0.1}).config.transformers
    assert not plugin(50, schedule="cosine").config.transformers  # nanoGPT's cosine unless family says otherwise
    with pytest.raises(ValueError, match="warmup_stable_decay"):
        Config(schedule="wsd", family="transformers")
    with pytest.raises(ValueError, match='set family = "transformers"'):
        Config(schedule="cosine", hf_kwargs={"num_cycles": 1})
    with pytest.raises(ConfigError, match="plugin.lr: transformers schedule 'cosine'.*hf_kwargs"):
        plugin(50, schedule="cosine", family="transformers", hf_kwargs={"no_such": 1})


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd", "inverse_sqrt", "cosine_with_min_lr"])
def test_a_warmup_longer_than_the_run_warns_and_trains(schedule, tmp_path):
    import json

    from tests.conftest import ROOT, TINY_GPT, run_cli

    sets = [*TINY_GPT, "train.max_steps=3", "train.log_interval=1", "train.threads=1", "train.eval_interval=0",
            f"plugin.lr.schedule='{schedule}'", 'plugins=["lr", "checkpoint", "jsonl"]']
    if schedule == "cosine_with_min_lr":
        sets.append("plugin.lr.hf_kwargs={min_lr_rate = 0.1}")
    proc = run_cli("run", str(ROOT / "configs" / "shakespeare_char.toml"), "--yes", "--out", str(tmp_path),
                   *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr
    assert "warning: plugin.lr warmup (100 steps) is not shorter than the schedule (3 steps)" in proc.stderr
    assert "warmup 100 steps (trainctl's default; TRL's is 0): not shorter than the 3-step schedule" in proc.stdout
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    lrs = [e["lr"] for e in events if e["event"] == "step"]
    peak = 3e-3
    want = [peak * s / 100 for s in range(3)] if schedule == "cosine_with_min_lr" else [peak * (s + 1) / 101 for s in range(3)]
    assert lrs == pytest.approx(want)
