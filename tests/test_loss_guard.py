"""Non-finite updates are skipped with parameters and optimizer state bit-identical; the loss
guard counts them, fails the run after N in a row, and reports (optionally skips) spikes."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_GPT, make_config
from trainctl.kernel.run import Run

FAST = [*TINY_GPT, "train.threads=1"]


def gpt_run(registry, out, *overrides):
    return Run(make_config(registry, out, *FAST, *overrides, backend="gpt"), registry, resume="never")


def snapshot(backend):
    params = {k: v.detach().clone() for k, v in backend.raw_model.state_dict().items()}
    return params, flat(backend.optimizer.state_dict())


def flat(value, prefix="") -> dict:
    """Every tensor and number in an optimizer state dict, by path (cloned)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}/{i}").items()}
    if isinstance(value, torch.Tensor):
        return {prefix: value.detach().clone()}
    return {prefix: torch.tensor(float(value))} if isinstance(value, (int, float)) else {}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("into", ["loss", "grad"])
@pytest.mark.parametrize("accum", [1, 2])
def test_nan_step_leaves_parameters_and_optimizer_bit_identical(registry, tmp_path, into, accum):
    # micro-batch calls: step 0 uses calls 0..accum-1; poison the last micro-batch of step 2
    poisoned = 3 * accum - 1
    session = gpt_run(registry, tmp_path / "o", 'plugins=["inject_nan"]', f"train.grad_accum={accum}",
                      f"plugin.inject_nan.calls=[{poisoned}]", f"plugin.inject_nan.into='{into}'")
    backend = session.backend
    for step in range(2):
        assert not bool(backend.train_step(step).skipped)
    before_params, before_state = snapshot(backend)
    out = backend.train_step(2)
    assert bool(out.skipped)
    if into == "grad":
        assert torch.isfinite(out.loss) and not torch.isfinite(out.grad_norm)
    else:
        assert not torch.isfinite(out.loss)
    after_params, after_state = snapshot(backend)
    assert same(before_params, after_params)
    assert len(before_state) > 10 and same(before_state, after_state)  # moments and step counts untouched
    assert float(out.skipped_updates) == 1 and float(out.skip_streak_max) == 1
    out = backend.train_step(3)  # the next step applies normally
    assert not bool(out.skipped) and not same(after_params, snapshot(backend)[0])


def test_muon_skips_too(registry, tmp_path):
    session = gpt_run(registry, tmp_path / "o", 'plugins=["inject_nan"]', "optim.name='muon'", "plugin.inject_nan.calls=[1]")
    backend = session.backend
    backend.train_step(0)
    before = snapshot(backend)
    assert bool(backend.train_step(1).skipped)
    after = snapshot(backend)
    assert same(before[0], after[0]) and same(before[1], after[1])


def test_guard_fails_the_run_after_n_skips_in_a_row(registry, tmp_path):
    out = tmp_path / "o"
    session = gpt_run(registry, out, 'plugins=["inject_nan", "loss_guard", "checkpoint", "recorder", "jsonl"]',
                      "train.max_steps=30", "train.log_interval=4", "plugin.loss_guard.max_skips=3",
                      "plugin.inject_nan.calls=[2, 9, 10, 11, 12, 13, 14, 15]")
    result = session.fit()
    assert result.status == "failed" and result.step == 12  # streak of 3 reached at step 12, seen at the log
    assert "loss guard: 3 updates in a row were skipped" in result.reason
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["event"] == "notice" and e["kind"] == "skipped_update"]
    assert [e["data"]["total"] for e in skipped] == [1, 4]  # one at step 3, three more by step 12
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "failed"
    assert not [e for e in events if e["event"] == "save"]  # a failed run saves nothing


def test_spike_is_reported_and_then_skipped_on_the_device(registry, tmp_path):
    from trainctl.hooks.events import StepEnd
    from trainctl.hooks.plugin import RunInfo
    from trainctl.plugins.loss_guard import Config, SpikeSkippingGuard, make

    emitted = []
    run = RunInfo(run_name="r", backend="gpt", out_dir=tmp_path, max_steps=100, emit=emitted.append)
    guard = make(Config(spike_min_history=5, spike_sigma=3.0, skip_spikes=True), run)
    assert isinstance(guard, SpikeSkippingGuard)
    base = torch.tensor(2.0)
    assert guard.trainctl_loss_terms(None, None, base) is None  # no threshold yet: no term
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.05, 1.95, 2.0, 9.0, 2.0], start=1):
        guard.trainctl_step_end(StepEnd(step=step, max_steps=100, lr=0.1, tokens=0, step_time=0.1, logged=True,
                                        loss=loss, time=0.0))
    spikes = [n for n in emitted if n.kind == "loss_spike"]
    assert [n.step for n in spikes] == [7] and spikes[0].data["loss"] == 9.0
    assert 9.0 not in guard.window
    _, term = guard.trainctl_loss_terms(None, None, torch.tensor(9.0))
    assert torch.isnan(term)  # makes the step's loss non-finite: the backend skips the update
    _, term = guard.trainctl_loss_terms(None, None, torch.tensor(2.0))
    assert term.item() == 0.0


def test_plain_guard_adds_no_loss_term(registry, tmp_path):
    session = gpt_run(registry, tmp_path / "o", 'plugins=["loss_guard"]')
    assert session.backend.ctx.loss_terms is None  # nothing in the step when skip_spikes is off
