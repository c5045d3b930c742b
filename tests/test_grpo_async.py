"""Asynchronous GRPO generation (``hf.grpo.max_staleness = k > 0``, ``grpo_async.py``): a generator
thread with its own policy copy runs ahead of the trainer; no trained batch is more than k
versions behind, stale batches carry TRL's importance-sampling ratio, the idle fractions reach
the events, status and Prometheus; a stop saves and exits with the thread joined, and the run
resumes; a k = 0 checkpoint written before the new keys existed still resumes; bad settings are
one line before the model loads."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from tests.conftest import make_config, run_cli
from tests.live import LiveRun, sets
from tests.test_grpo_cli import GOOD, broken_weights, grpo, one_line, prompts  # noqa: F401  (fixtures)
from tests.test_grpo_resume import craft, qwen3  # noqa: F401  (qwen3: the tiny model and 8 prompts)
from trainctl.backends.hf.grpo_state import STATE_FILE
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run import Run

REWARD = "tests.grpo_rewards:e_share"


def settings(model_dir: Path, data: Path, *, steps: int, k: int = 1, plugins: str = '"checkpoint", "status", "jsonl"',
             ) -> list[str]:
    return [
        f"plugins=[{plugins}]", "seed=7", f"model.name_or_path='{model_dir}'", f"data.train='{data}'",
        "model.max_length=128", f"train.max_steps={steps}", "train.batch_size=4", "train.grad_accum=2",
        "train.device='cpu'", "train.threads=1", "train.log_interval=1", "train.eval_interval=0", "optim.lr=1e-3",
        "hf.objective='grpo'", f"hf.grpo.rewards=['{REWARD}']", "hf.grpo.num_generations=4",
        "hf.grpo.max_completion_length=8", "hf.grpo.beta=0.04", f"hf.grpo.max_staleness={k}",
    ]


def events(out: Path) -> list[dict]:
    found = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return found[max(i for i, e in enumerate(found) if e["event"] == "run_start"):]  # the last run's


def test_staleness_never_exceeds_k_and_stale_batches_are_corrected(registry, qwen3, tmp_path):
    out = tmp_path / "run"
    result = Run(make_config(registry, out, *settings(*qwen3, steps=6), backend="hf"), registry, resume="never").fit()
    assert result.status == "completed", result.reason
    assert not [t for t in threading.enumerate() if t.name == "trainctl-grpo-generator"]  # joined at the end
    found = events(out)
    rollouts = [e for e in found if e["event"] == "rollout"]
    steps = {e["step"]: e["metrics"] for e in found if e["event"] == "step"}
    assert len(rollouts) == 6 and not [e for e in found if e.get("kind") == "stale_batch_dropped"]
    assert all(r["staleness"] <= 1 for r in rollouts)
    # batch 1 is made from version 0 while step 0 trains: the overlap is real, staleness reaches k
    assert rollouts[0]["staleness"] == 0 and rollouts[1]["staleness"] == 1
    assert all(0 <= r["trainer_idle_fraction"] <= 1 and 0 <= r["generator_idle_fraction"] <= 1 for r in rollouts)
    # a batch of the current version has ratio 1; a stale one is TRL's exp(old - sampling), not all 1
    assert steps[1]["sampling/importance_sampling_ratio/mean"] == 1.0
    stale = [steps[r["step"] + 1] for r in rollouts if r["staleness"] == 1]
    assert any(m["sampling/importance_sampling_ratio/mean"] != 1.0 for m in stale)
    assert all(0 <= m["sampling/importance_sampling_ratio/max"] <= 3.0 for m in stale)  # clip_max: masked above
    assert all("reward" in m and "kl" in m for m in steps.values())  # generator's and trainer's TRL metrics
    rollout = json.loads((out / "status.json").read_text())["rollout"]
    assert rollout["trainer_idle_fraction"] is not None and rollout["generator_idle_fraction"] is not None
    assert rollout["staleness_counts"] == {str(s): sum(r["staleness"] == s for r in rollouts) for s in (0, 1)}


def live(qwen3, out: Path) -> LiveRun:
    """A k = 1 CLI run that runs until it is stopped."""
    return LiveRun(out, model=settings(*qwen3, steps=10_000, plugins='"controller", "checkpoint", "status", "jsonl"'),
                   args=["--backend", "hf"])


def test_ctl_stop_saves_joins_and_resumes_with_pending_batches_regenerated(qwen3, tmp_path):
    out = tmp_path / "live"
    run = live(qwen3, out)
    try:
        run.wait(lambda s: s["state"] == "running" and s["step"] >= 3, timeout=120)
        stop = run_cli("ctl", str(out), "stop", timeout=60)
        assert stop.returncode == 0 and stop.stdout.startswith("stop: stopping"), stop.stdout + stop.stderr
        assert run.exit_code() == 0  # the generator thread stopped and joined: no hang
    finally:
        run.close()
    stopped = run.status()["step"]
    state = json.loads((out / "checkpoints" / f"step-{stopped:06d}" / STATE_FILE).read_text())
    assert not state["buffered"] and state["step"] == 2 * stopped  # pending batches are not in the checkpoint
    resumed = run_cli("run", "--yes", "--backend", "hf", "--out", str(out), "--resume", "auto",
                      *sets(*settings(*qwen3, steps=stopped + 3)), timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume at step {stopped}" in resumed.stdout
    rollouts = [e for e in events(out) if e["event"] == "rollout"]
    assert [r["step"] for r in rollouts] == [stopped, stopped + 1, stopped + 2]
    assert rollouts[0]["staleness"] == 0 and rollouts[0]["policy_version"] == stopped  # regenerated from the saved policy
    assert all(r["staleness"] <= 1 for r in rollouts)


def test_a_k0_checkpoint_without_the_new_keys_still_resumes(registry, qwen3, tmp_path):
    out = tmp_path / "old"
    first = Run(make_config(registry, out, *settings(*qwen3, steps=2, k=0), backend="hf"), registry, resume="never").fit()
    assert first.status == "completed", first.reason
    ckpt = out / "checkpoints" / "step-000002"
    state = json.loads((ckpt / STATE_FILE).read_text())
    for key in [key for key in state["settings"] if "max_staleness" in key or "importance_sampling_c" in key
                or "importance_sampling_mode" in key]:
        del state["settings"][key]  # as a checkpoint written before asynchronous generation existed
    craft(ckpt, STATE_FILE, json.dumps(state).encode())
    second = Run(make_config(registry, out, *settings(*qwen3, steps=3, k=0), backend="hf"), registry, resume="auto").fit()
    assert second.status == "completed", second.reason
    assert second.step == 3
    with pytest.raises(ConfigError, match=r"hf\.grpo\.max_staleness: 0 -> 1"):  # a real change is still refused
        Run(make_config(registry, out, *settings(*qwen3, steps=4, k=1), backend="hf"), registry, resume="auto").fit()


BAD = {
    "negative": (["hf.grpo.max_staleness=-1"], ("hf.grpo.max_staleness",)),
    "with reuse": (["hf.grpo.max_staleness=1", "hf.grpo.num_iterations=2"],
                   ("max_staleness = 1", "num_iterations = 2", "set max_staleness = 0")),
    "with LoRA": (["hf.grpo.max_staleness=2", "hf.lora.r=4"], ("max_staleness = 2", "[hf.lora]")),
    "unknown IS mode": (["hf.grpo.max_staleness=1", "hf.grpo.importance_sampling_mode='token'"],
                        ("hf.grpo.importance_sampling_mode",)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_async_settings_are_one_line_before_the_model_loads(hf, prompts, broken_weights, tmp_path, case):
    overrides, expected = BAD[case]
    line = one_line(grpo(hf, tmp_path / "out", prompts, f"hf.grpo.rewards=['{GOOD}']", *overrides, model=broken_weights))
    for part in expected:
        assert part in line, line
    assert "safetensors" not in line  # the weights were never read


def test_a_reward_failing_in_the_generator_is_one_line_naming_it(hf, prompts, tmp_path):
    line = one_line(grpo(hf, tmp_path / "out", prompts, "hf.grpo.rewards=['tests.grpo_rewards:raises']",
                         "hf.grpo.max_staleness=1"))
    assert "reward 'tests.grpo_rewards:raises' raised RuntimeError: the grader is down" in line, line


def test_import_trl_maps_trls_importance_sampling_keys(tmp_path):
    import tomllib

    source = tmp_path / "grpo.yaml"
    source.write_text("num_generations: 4\nvllm_importance_sampling_mode: token_truncate\n"
                      "vllm_importance_sampling_clip_max: 2.0\nvllm_importance_sampling_clip_min: null\n")
    proc = run_cli("config", "import-trl", str(source), "-o", str(tmp_path / "grpo.toml"), check=True)
    grpo = tomllib.loads((tmp_path / "grpo.toml").read_text())["hf"]["grpo"]
    assert (grpo["importance_sampling_mode"], grpo["importance_sampling_clip_max"],
            grpo["importance_sampling_clip_min"]) == ("token_truncate", 2.0, 0.0)
    assert "importance_sampling_correction" not in grpo  # not in the file: trainctl's default stands
    notes = [line for line in proc.stderr.splitlines() if "vllm_importance_sampling" in line]
    assert len(notes) == 3 and all("max_staleness > 0" in line for line in notes), proc.stderr


def test_prometheus_exports_the_idle_fractions_and_batches_by_staleness(tmp_path):
    from prometheus_client import generate_latest

    from tests.test_prometheus import exporter
    from trainctl.hooks.events import RolloutReceived

    plugin, _ = exporter(tmp_path)
    for step, staleness in enumerate((0, 1, 1)):
        plugin.trainctl_rollout_received(RolloutReceived(
            step=step, policy_version=step - staleness, staleness=staleness, completions=8, tokens=40, generation_s=0.1,
            trainer_idle_fraction=0.25 / (step + 1), generator_idle_fraction=0.5, time=1.0))
    text = generate_latest(plugin.registry).decode()
    labels = 'backend="fake",rank="0",run="t"'
    assert f"trainctl_rollout_trainer_idle_fraction{{{labels}}} {0.25 / 3}" in text
    assert f"trainctl_rollout_generator_idle_fraction{{{labels}}} 0.5" in text
    assert f'trainctl_rollout_staleness_batches_total{{{labels},staleness="0"}} 1.0' in text
    assert f'trainctl_rollout_staleness_batches_total{{{labels},staleness="1"}} 2.0' in text


def test_trainctl_status_rollout_line_shows_the_idle_fractions():
    from trainctl.cli.status import rollout_lines

    doc = {"rollout": {"policy_version": 5, "staleness": 1, "dropped": 0, "trainer_idle_fraction": 0.07,
                       "generator_idle_fraction": 0.4}}
    assert rollout_lines(doc) == ["rollout    policy version 5, staleness 1, 0 stale batches dropped, "
                                  "trainer idle 7%, generator idle 40%"]
    synchronous = {"rollout": {"policy_version": 5, "staleness": 0, "dropped": 1, "trainer_idle_fraction": None}}
    assert rollout_lines(synchronous) == ["rollout    policy version 5, staleness 0, 1 stale batch dropped"]


def test_sigterm_while_the_generator_runs_saves_and_exits(qwen3, tmp_path):
    import signal

    out = tmp_path / "live"
    run = live(qwen3, out)
    try:
        run.wait(lambda s: s["state"] == "running" and s["step"] >= 2, timeout=120)
        run.proc.send_signal(signal.SIGTERM)  # the generator is a batch ahead: mid-generation or waiting
        assert run.exit_code() == 0, run.output()  # saved, thread joined, no hang
        assert "Traceback" not in run.output()
        # the memory plan: reference (beta > 0) + the generator's copy + its staging copy = 3 x the parameters
        plan = re.search(r"parameters ([\d.]+) KiB, .*frozen model ([\d.]+) MiB", run.output())
        assert plan and abs(float(plan[2]) * 1024 - 3 * float(plan[1])) < 0.05 * 1024, run.output()
    finally:
        run.close()
    status = run.status()
    assert status["state"] == "stopped" and status["reason"] == "signal", status
    assert (out / "checkpoints" / f"step-{status['step']:06d}" / STATE_FILE).exists()


def test_behaviour_logps_from_generation_and_the_ratio_from_the_losss_forward_equal_trls(registry, qwen3, tmp_path):
    """The generator's sampling_per_token_logps come from generate's own forwards (no second pass):
    they are TRL's _get_per_token_logps_and_entropies of the same weights, to float32 rounding; a
    stale batch's ratio, made from the loss's own forward, is TRL's exp(old - sampling) from a
    forward of its own, and the loss with it TRL's."""
    import torch

    from trainctl.backends.hf.grpo_backend import GRPOBackend
    from trainctl.backends.hf.grpo_offpolicy import OffPolicyRollouts, generate, prepare_generator
    from trainctl.kernel.backend import BackendContext

    resolved = make_config(registry, tmp_path, *settings(*qwen3, steps=1), "hf.grpo.temperature=0.7",
                           "hf.grpo.importance_sampling_mode='token_truncate'", backend="hf")
    gen = GRPOBackend(BackendContext.of(resolved, out_dir=tmp_path)).generator_side()
    prepare_generator(gen, resolved.sections["hf"].grpo)
    with torch.no_grad():  # EOS likely after some tokens, not others: completions of several lengths
        gen.model.get_output_embeddings().weight[gen.trainer.processing_class.eos_token_id] *= 20
    micro = generate(gen, 0, 0).micro
    lengths = set()
    for inputs in micro:
        mask = inputs["completion_mask"].bool()
        lengths |= set(mask.sum(1).tolist())
        with torch.no_grad():
            forward = gen.logps(gen.model, inputs)
        recorded = inputs["sampling_per_token_logps"]
        assert recorded.shape == forward.shape
        assert torch.allclose(recorded[mask], forward[mask], atol=1e-5, rtol=0), (recorded - forward)[mask].abs().max()
        assert (recorded[mask] < 0).all()
    assert len(lengths) > 1  # completions of several lengths: the EOS-cut rows are matched too

    # the batch made stale: the ratio the loss makes from its own forward is TRL's from a forward of its own
    opts = resolved.sections["hf"].grpo
    producer = OffPolicyRollouts(trainer_side=gen, opts=opts, grad_accum=len(micro))
    with torch.no_grad():
        for param in gen.model.parameters():
            param.add_(torch.randn_like(param), alpha=1e-2)
    trainer, inputs = gen.trainer, micro[0]
    gen.model.requires_grad_(True)
    loss = producer.loss(gen.model, inputs)
    with torch.no_grad():
        old = gen.logps(gen.model, inputs)
    mask = inputs["completion_mask"]
    ratio = torch.clamp(torch.exp((old - inputs["sampling_per_token_logps"]) * mask),
                        max=opts.importance_sampling_clip_max)
    assert torch.allclose(producer.ratios[0], ratio[mask.bool()], atol=1e-6, rtol=0)
    assert (producer.ratios[0] != 1).any()
    trainer.use_vllm = True
    expected = trainer._compute_loss(gen.model, {k: v for k, v in inputs.items() if k != "sampling_per_token_logps"}
                                     | {"old_per_token_logps": old, "importance_sampling_ratio": ratio})
    trainer.use_vllm = False
    assert torch.allclose(loss, expected, atol=1e-7, rtol=1e-6), (loss, expected)
    assert producer.step_metrics()["sampling/importance_sampling_ratio/mean"] == pytest.approx(float(ratio[mask.bool()].mean()))
    gen.close()
