"""The backend contract, checked the same way on every backend: the two built-ins and a
third-party backend installed through the ``trainctl.plugins`` entry point (``tests/tiny_backend.py``
as the package ``trainctl_tiny``), all with gradient accumulation.

- every step reports the same typed outputs and skip counters, and the kernel turns them into
  the same ``StepEnd`` fields (measured ``tokens_per_s``, each step's own ``step_time``);
- a non-finite step leaves parameters and optimizer state bit-identical and counts the skip;
- save -> load -> the next step's loss equals the uninterrupted run's;
- evaluation and ``measure`` leave training state (parameters, optimizer, RNG) untouched, and
  evaluation reports loss, token accuracy and perplexity;
- ``trainctl_loss_terms`` receives the micro-batch's mean cross-entropy, (B, T, V) logits and
  (B, T) targets with negative ignored positions; ``z_loss`` and ``loss_guard``'s spike
  skipping work through it.

The fake backend of the kernel tests has no parameters or optimizer: it is left out.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import fault_plugins, probe_plugins, recording_plugins
from tests.conftest import ROOT, TINY_GPT, cli_env, make_config
from tests.recording_plugins import INSTANCES
from tests.test_loss_guard import flat, same
from trainctl.hooks.events import EvalEnd, StepEnd
from trainctl.kernel.backend import Evaluation, StepOutput
from trainctl.kernel.registry import Registry
from trainctl.kernel.run import Run

BACKENDS = ["gpt", "hf", "tiny"]
BASE = {
    "gpt": [*TINY_GPT, "model.dropout=0.1"],  # dropout: restoring the RNG matters
    "tiny": ["train.batch_size=4", "train.device='cpu'", "optim.lr=1e-2"],
}
COMMON = ["train.grad_accum=2", "train.threads=1", "train.log_interval=1", "train.eval_steps=2",
          "train.eval_interval=0", "train.max_steps=6"]


def install_tiny(site: Path) -> None:
    """``tests/tiny_backend.py`` as an installed distribution with an entry point."""
    shutil.copy(Path(__file__).with_name("tiny_backend.py"), site / "trainctl_tiny.py")
    info = site / "trainctl_tiny-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trainctl-tiny\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[trainctl.plugins]\ntiny = trainctl_tiny\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    install_tiny(site)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))
    sys.modules.pop("trainctl_tiny", None)


@pytest.fixture(scope="module")
def registry(site) -> Registry:
    registry = Registry.discover()  # with entry points: finds trainctl_tiny
    assert registry.backends["tiny"].source == "trainctl-tiny"
    for module in (fault_plugins, probe_plugins, recording_plugins):
        registry.add_module(module, source="tests")
    return registry


@pytest.fixture(params=BACKENDS)
def make(request, registry, tmp_path):
    """``make(*overrides)``: a set-up run of the parametrized backend in a fresh directory."""
    name = request.param
    base = BASE.get(name) or request.getfixturevalue("hf").sets()
    count = iter(range(100))

    def make(*extra: str) -> Run:
        out = tmp_path / f"run{next(count)}"
        return Run(make_config(registry, out, *base, *COMMON, *extra, backend=name), registry, resume="never")

    make.name = name
    return make


def params(backend) -> dict[str, torch.Tensor]:
    return {f"param/{i}": p.detach().clone() for i, p in enumerate(backend.stepper.params)}


def snapshot(backend) -> dict[str, torch.Tensor]:
    """Parameters and every tensor and number of the optimizer state, cloned."""
    return params(backend) | flat(backend.stepper.optimizer.state_dict(), "optim")


def test_every_backend_reports_the_same_step_outputs_and_events(make):
    s = make('plugins=["recorder"]', "train.max_steps=4", "train.eval_interval=2")
    out = s.backend.train_step(0)
    assert isinstance(out, StepOutput)
    for name in ("loss", "grad_norm", "skipped", "skipped_updates", "skip_streak_max"):
        value = getattr(out, name)
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
    assert out.skipped.dtype == torch.bool and not bool(out.skipped)
    assert float(out.skipped_updates) == 0 and float(out.skip_streak_max) == 0
    assert isinstance(out.tokens, int) and out.tokens > 0 and (out.processed_tokens or 0) >= out.tokens
    assert not {"loss", "grad_norm", "skipped", "skipped_updates", "skip_streak_max"} & set(out.metrics)

    assert s.fit().status == "completed"
    events = INSTANCES["recorder"].events
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert [e.step for e in steps] == [1, 2, 3, 4] and all(e.logged for e in steps)
    trained = 0
    for e in steps:
        assert math.isfinite(e.loss) and e.grad_norm > 0 and not e.skipped
        assert e.skipped_updates == 0 and e.skip_streak_max == 0
        assert e.step_time > 0 and e.mean_step_time == pytest.approx(e.step_time)  # logged every step
        # measured: the step's trained tokens over its time (one step per interval here)
        assert e.tokens_per_s == pytest.approx((e.tokens - trained) / e.step_time)
        trained = e.tokens
    evals = [e for e in events if isinstance(e, EvalEnd)]
    assert evals and {e.step for e in evals} == {2, 4}
    for e in evals:
        assert 0.0 <= e.metrics["accuracy"] <= 1.0 and e.metrics["perplexity"] == pytest.approx(math.exp(e.loss))


@pytest.mark.parametrize("into", ["loss", "grad"])
def test_a_non_finite_step_changes_nothing_and_is_counted(make, into):
    # loss_terms is called once per micro-batch: calls 2 and 3 are step 1's; poison its second
    s = make('plugins=["inject_nan"]', "plugin.inject_nan.calls=[3]", f"plugin.inject_nan.into='{into}'")
    backend = s.backend
    assert not bool(backend.train_step(0).skipped)
    before = snapshot(backend)
    out = backend.train_step(1)
    assert bool(out.skipped)
    assert same(before, snapshot(backend))
    assert float(out.skipped_updates) == 1 and float(out.skip_streak_max) == 1
    if into == "grad":
        assert torch.isfinite(out.loss) and not torch.isfinite(out.grad_norm)
    out = backend.train_step(2)  # the next step applies, and the streak is over
    assert not bool(out.skipped) and not same(before, snapshot(backend))
    assert float(out.skipped_updates) == 1 and float(out.skip_streak_max) == 1


def test_save_load_then_the_next_step_equals_the_uninterrupted_run(make, tmp_path):
    first = make("plugins=[]")
    for step in range(2):
        first.backend.train_step(step)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    first.backend.save(checkpoint)
    expected = first.backend.train_step(2).loss

    second = make("plugins=[]")
    torch.manual_seed(12345)  # whatever the RNG is now, load must restore the saved one
    second.backend.load(checkpoint)
    assert torch.equal(second.backend.train_step(2).loss, expected)
    assert same(snapshot(first.backend), snapshot(second.backend))


def test_evaluation_leaves_training_state_alone(make):
    s = make("plugins=[]")
    rng = torch.get_rng_state()
    s.backend.train_step(0)
    before, rng_before = snapshot(s.backend), torch.get_rng_state()
    results = s.backend.evaluate(1)
    assert same(before, snapshot(s.backend)) and torch.equal(rng_before, torch.get_rng_state())
    assert s.backend.stepper.parallel.model.training
    assert "val" in results
    for r in results.values():
        assert isinstance(r, Evaluation) and r.loss > 0 and 0.0 <= r.accuracy <= 1.0 and r.tokens > 0
        assert r.perplexity == pytest.approx(math.exp(r.loss))
    after_eval = s.backend.train_step(1).loss

    twin = make("plugins=[]")  # the same steps without the evaluation
    torch.set_rng_state(rng)
    twin.backend.train_step(0)
    assert torch.equal(twin.backend.train_step(1).loss, after_eval)


def test_eval_metric_plugins_get_every_batch_and_cost_nothing_when_off(make):
    """``topk_accuracy`` through ``trainctl_eval_metrics``: top-1 is the kernel's token accuracy,
    top-3 at least that; the loss is the one evaluated without the plugin (hf: its own head
    instead of the fused one, equal up to rounding); without the plugin no logits reach scoring."""
    s = make('plugins=["topk_accuracy"]', "plugin.topk_accuracy.k=[1, 3, 1000000]")  # past the vocabulary: every token
    results = s.backend.evaluate(0)
    plain = make("plugins=[]")
    assert plain.backend.ctx.eval_metrics is None
    without = plain.backend.evaluate(0)
    for split, r in results.items():
        assert set(r.metrics) == {"top1_accuracy", "top3_accuracy", "top1000000_accuracy"}
        assert r.metrics["top1_accuracy"] == pytest.approx(r.accuracy, abs=1e-12)
        assert r.accuracy <= r.metrics["top3_accuracy"] <= r.metrics["top1000000_accuracy"] == 1.0
        assert r.loss == pytest.approx(without[split].loss, rel=1e-5) and r.tokens == without[split].tokens
        assert without[split].metrics == {}


def test_measure_leaves_weights_optimizer_and_rng_alone(make):
    s = make("plugins=[]")
    s.backend.train_step(0)
    before, rng = snapshot(s.backend), torch.get_rng_state()
    assert s.backend.measure(1) > 0
    assert same(before, snapshot(s.backend)) and torch.equal(rng, torch.get_rng_state())


def test_loss_terms_receive_the_documented_values(make):
    s = make('plugins=["probe"]')
    s.backend.train_step(0)
    calls = probe_plugins.CALLS
    assert len(calls) == 2  # one per micro-batch (grad_accum 2, one process)
    for call in calls:
        B, T, V = call["logits"]
        assert call["targets"] == (B, T) and call["targets_dtype"] == torch.long and call["logits_grad"]
        assert call["loss_dim"] == 0
        # the micro-batch's mean cross-entropy over its scored (non-ignored) targets
        assert torch.allclose(call["loss"], call["mean_ce"], rtol=1e-5, atol=1e-6), (call["loss"], call["mean_ce"])
    if make.name == "hf":
        assert all(c["ignored"] > 0 for c in calls)  # prompt tokens are masked with a negative index


def test_z_loss_is_added_to_the_loss_and_reported(make):
    s = make('plugins=["z_loss"]')
    rng = torch.get_rng_state()
    out = s.backend.train_step(0)
    z = float(out.metrics["z_loss"])
    assert z > 0
    plain = make("plugins=[]")
    torch.set_rng_state(rng)
    base = plain.backend.train_step(0)
    assert abs(float(out.loss) - z - float(base.loss)) < 1e-5
    assert not same(snapshot(s.backend), snapshot(plain.backend))  # the term has a gradient


def test_spike_skipping_skips_on_the_device_and_fails_the_run(make):
    guard = ['plugins=["loss_guard"]', "plugin.loss_guard.skip_spikes=true", "plugin.loss_guard.max_skips=3",
             "plugin.loss_guard.spike_min_history=2"]
    s = make(*guard)
    # a history of tiny losses: every micro-batch's mean cross-entropy is now a spike
    s.bus.load_state_dict({"loss_guard": {"window": [1e-3, 1e-3, 1e-3]}})
    before = params(s.backend)
    result = s.fit()
    assert result.status == "failed" and "3 updates in a row were skipped" in result.reason
    assert same(before, params(s.backend))  # no update was applied

    calm = make(*guard)
    calm.bus.load_state_dict({"loss_guard": {"window": [1e3, 1e3, 1e3]}})
    before = params(calm.backend)
    assert calm.fit().status == "completed" and not same(before, params(calm.backend))


def test_third_party_backend_through_the_real_cli(site, tmp_path):
    env = cli_env()
    env["PYTHONPATH"] = f"{site}:{ROOT}"
    out = tmp_path / "run"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trainctl", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    listed = cli("backends")
    assert listed.returncode == 0 and "tiny" in listed.stdout and "trainctl-tiny" in listed.stdout
    sets = ["--set", "train.max_steps=4", "--set", "train.device='cpu'", "--set", "train.threads=1",
            "--set", "train.grad_accum=2", "--set", "train.batch_size=4", "--set", "train.log_interval=2",
            "--set", "train.eval_interval=2", "--set", "train.eval_steps=2", "--set", 'plugins=["checkpoint", "jsonl"]']
    run = cli("run", "--backend", "tiny", "--out", str(out), "-y", *sets)
    assert run.returncode == 0, run.stdout + run.stderr
    resumed = cli("run", "--backend", "tiny", "--out", str(out), "-y", *sets, "--set", "train.max_steps=6")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step" and e["logged"]]
    assert [e["step"] for e in steps] == [2, 4, 6]
    assert all(e["skipped_updates"] == 0 and e["skip_streak_max"] == 0 and e["tokens_per_s"] > 0 for e in steps)
    evals = [e for e in events if e["event"] == "eval"]
    assert {e["step"] for e in evals} >= {2, 4, 6} and all("accuracy" in e["metrics"] for e in evals)
    assert any(e["event"] == "run_start" and e["resumed_from"] for e in events)


def test_muon_decays_the_hidden_matrices_by_optim_weight_decay(make):
    decayed = make("optim.name='muon'", "optim.weight_decay=0.5", "optim.muon_lr=0.02", "plugins=[]")
    group = decayed.backend.stepper.optimizer.muon.param_groups[0]
    assert group["weight_decay"] == 0.5
    start = [p.detach().clone() for p in group["params"]]
    rng = torch.get_rng_state()
    decayed.backend.train_step(0)
    plain = make("optim.name='muon'", "optim.weight_decay=0.0", "optim.muon_lr=0.02", "plugins=[]")
    torch.set_rng_state(rng)
    plain.backend.train_step(0)
    # Muon: p <- p * (1 - lr * wd) - lr * update; the first update is the same in both runs
    after = plain.backend.stepper.optimizer.muon.param_groups[0]["params"]
    for p0, a, b in zip(start, group["params"], after, strict=True):
        assert torch.allclose(a - b, -0.02 * 0.5 * p0, atol=1e-6)
