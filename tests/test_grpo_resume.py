"""A GRPO run resumes exactly: stopped in the middle of a buffered generation (each generation
is trained on for two steps: ``num_iterations = 2``, ``grad_accum = 2``) and resumed with
``--resume auto`` through the real CLI, every step after the stop has the loss, KL, rewards,
clip ratios, gradient norm and completions of the uninterrupted run, bit for bit, across an
epoch's end (RepeatSampler's next order). A checkpoint whose producer state is missing or
crafted is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import grpo_rewards, hf_assets
from tests.conftest import make_config, run_cli
from tests.live import LiveRun, sets
from trainctl.backends.hf.grpo_state import STATE_FILE, TENSORS_FILE
from trainctl.kernel.checkpoint_files import MANIFEST, sha256_file
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run import Run

STEPS, STOP, SEED, REWARD = 32, 11, 7, "tests.grpo_rewards:recorded"
COMPARED = ("loss", "grad_norm", "kl", "entropy", "reward", "reward_std", f"rewards/{REWARD}/mean",
            "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
            "num_tokens")


@pytest.fixture(scope="module")
def qwen3(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_resume")
    # 8 prompts, 2 per generation: a pass over them is 4 generations, 8 steps; a stop at 11 is in the
    # second pass (RepeatSampler's generator has moved on), the resumed run crosses two more
    return hf_assets.grpo_assets(root, hf.tokenizer, 8)


def settings(model_dir: Path, prompts: Path, steps: int = STEPS) -> list[str]:
    return [
        'plugins=["controller", "checkpoint", "status", "jsonl"]', f"seed={SEED}", f"model.name_or_path='{model_dir}'",
        f"data.train='{prompts}'", "model.max_length=128", f"train.max_steps={steps}", "train.batch_size=4",
        "train.grad_accum=2", "train.device='cpu'", "train.threads=1", "train.log_interval=1", "train.eval_interval=0",
        "optim.lr=1e-3", "optim.weight_decay=0.0", "hf.objective='grpo'", f"hf.grpo.rewards=['{REWARD}']",
        "hf.grpo.num_generations=4", "hf.grpo.max_completion_length=8", "hf.grpo.num_iterations=2", "hf.grpo.beta=0.04",
        "hf.grpo.epsilon=0.02",  # small: the reused steps clip, so the clip ratios are not all zero
    ]


def cli_run(out: Path, *overrides: str, resume: str = "auto"):
    return run_cli("run", "--yes", "--backend", "hf", "--out", str(out), "--resume", resume, *sets(*overrides), timeout=240)


def last_run(out: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """The steps (metrics flattened in) and rollouts of the last run written to ``out``'s events."""
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    start = max(i for i, e in enumerate(events) if e["event"] == "run_start")
    events = events[start:]
    return ({e["step"]: e | e["metrics"] for e in events if e["event"] == "step"},
            {e["step"]: e for e in events if e["event"] == "rollout"})


@pytest.fixture(scope="module")
def whole(registry, qwen3, tmp_path_factory):
    """The uninterrupted run, in process, and the completions its reward scored (one list per generation)."""
    out = tmp_path_factory.mktemp("grpo_whole")
    grpo_rewards.SEEN.clear()
    result = Run(make_config(registry, out, *settings(*qwen3), backend="hf"), registry, resume="never").fit()
    assert result.status == "completed", result.reason
    return out, list(grpo_rewards.SEEN)


def test_stop_mid_generation_and_resume_is_bit_identical(qwen3, whole, tmp_path, monkeypatch):
    out, seen = tmp_path / "split", tmp_path / "completions.jsonl"
    first = cli_run(out, *settings(*qwen3, steps=STOP), resume="never")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = out / "checkpoints" / f"step-{STOP:06d}"
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["step"] == 2 * STOP and state["buffered"]  # 22 micro-batches: 2 of the generation's 4 still to go
    assert state["consumed"] == 2 * STOP - 16  # 16 generation batches (micro-batches) a pass
    assert {STATE_FILE, TENSORS_FILE} <= set(json.loads((ckpt / MANIFEST).read_text())["files"])

    monkeypatch.setenv(grpo_rewards.LOG_ENV, str(seen))
    second = cli_run(out, *settings(*qwen3))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resume at step {STOP}" in second.stdout

    (expected, their_rollouts), (got, our_rollouts) = last_run(whole[0]), last_run(out)
    assert sorted(got) == list(range(STOP + 1, STEPS + 1))
    for name in COMPARED:
        assert [got[s].get(name) for s in got] == [expected[s].get(name) for s in got], name
    assert any(expected[s].get("clip_ratio/region_mean") for s in got)  # the ratios moved: not trivially equal
    keys = ("policy_version", "staleness", "reused", "completions", "tokens")
    assert {s: [r[k] for k in keys] for s, r in our_rollouts.items()} == {s: [their_rollouts[s][k] for k in keys]
                                                                         for s in our_rollouts}
    assert our_rollouts[STOP]["reused"]  # the first step after the resume trains on the checkpoint's buffer
    generations_before = (STOP + 1) // 2  # one generation every 2 steps, the 6th (steps 10, 11) half used
    resumed = [json.loads(line) for line in seen.read_text().splitlines()]
    assert resumed == whole[1][generations_before:] and len(resumed) == (STEPS - STOP) // 2


def test_a_stop_at_the_end_of_a_pass_resumes_into_the_next(registry, qwen3, whole, tmp_path):
    """Step 8 ends the first pass over the prompts: the resumed run starts the second pass from
    the generator state the first one left (in process: the kernel's resume path, no CLI)."""
    out = tmp_path / "split"
    first = Run(make_config(registry, out, *settings(*qwen3, steps=8), backend="hf"), registry, resume="never").fit()
    assert first.status == "completed", first.reason
    assert json.loads((out / "checkpoints" / "step-000008" / STATE_FILE).read_text())["consumed"] == 16  # all of a pass
    second = Run(make_config(registry, out, *settings(*qwen3, steps=12), backend="hf"), registry, resume="auto").fit()
    assert second.status == "completed", second.reason
    (expected, _), (got, _) = last_run(whole[0]), last_run(out)
    assert sorted(got) == [9, 10, 11, 12]
    for name in COMPARED:
        assert [got[s].get(name) for s in got] == [expected[s].get(name) for s in got], name


def test_ctl_stop_then_resume_auto_gives_the_next_20_steps(registry, qwen3, tmp_path):
    """``trainctl ctl stop`` against a live run, wherever it lands, then ``--resume auto``."""
    out = tmp_path / "live"
    run = LiveRun(out, model=settings(*qwen3, steps=10_000), args=["--backend", "hf"])
    try:
        run.wait(lambda s: s["state"] == "running" and s["step"] >= 3, timeout=120)
        stop = run_cli("ctl", str(out), "stop", timeout=60)
        assert stop.returncode == 0 and stop.stdout.startswith("stop: stopping"), stop.stdout + stop.stderr
        assert run.exit_code() == 0
    finally:
        run.close()
    status = run.status()
    stopped = status["step"]
    assert status["state"] == "stopped" and status["reason"] == "request" and run.ledger()[-1]["step"] == stopped

    resumed = cli_run(out, *settings(*qwen3, steps=stopped + 20))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume at step {stopped}" in resumed.stdout
    whole = tmp_path / "whole"
    result = Run(make_config(registry, whole, *settings(*qwen3, steps=stopped + 20), backend="hf"), registry,
                 resume="never").fit()
    assert result.status == "completed", result.reason
    (expected, _), (got, _) = last_run(whole), last_run(out)
    assert sorted(got) == list(range(stopped + 1, stopped + 21))
    for name in COMPARED:
        assert [got[s].get(name) for s in got] == [expected[s].get(name) for s in got], name


def craft(ckpt: Path, name: str, data: bytes | None) -> None:
    """Replace (None: remove) a file, and its entry in the manifest, so the checkpoint verifies."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    if data is None:
        (ckpt / name).unlink()
        del manifest["files"][name]
    else:
        (ckpt / name).write_bytes(data)
        manifest["files"][name] = sha256_file(ckpt / name)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def test_a_missing_or_crafted_producer_state_is_one_line(registry, qwen3, tmp_path):
    from safetensors.torch import load, save

    out = tmp_path / "run"
    result = Run(make_config(registry, out, *settings(*qwen3, steps=1), backend="hf"), registry, resume="never").fit()
    assert result.status == "completed", result.reason
    ckpt = out / "checkpoints" / "step-000001"
    pristine = {name: (ckpt / name).read_bytes() for name in (STATE_FILE, TENSORS_FILE, MANIFEST)}
    state, tensors = json.loads(pristine[STATE_FILE]), load(pristine[TENSORS_FILE])
    out_of_vocab = save(tensors | {"buffer.0.completion_ids": tensors["buffer.0.completion_ids"] + 10**6})
    cases = [
        (STATE_FILE, b"{not json", f"{STATE_FILE} is not valid JSON"),
        (STATE_FILE, json.dumps(state | {"consumed": -1}).encode(), "consumed = -1 is not a whole number"),
        (STATE_FILE, json.dumps(state | {"consumed": 10**6}).encode(), "consumed = 1000000 is past the 16 batches of a pass"),
        (TENSORS_FILE, b"\x00" * 64, f"refused to load {ckpt / TENSORS_FILE}: not a readable safetensors file"),
        (TENSORS_FILE, out_of_vocab, "buffered micro-batch 0: completion_ids holds ids outside the vocabulary"),
        (TENSORS_FILE, None, f"{TENSORS_FILE} is missing"),
    ]
    for i, (name, data, message) in enumerate(cases):  # each in a run directory of its own: a refused Run keeps its claim
        for original, content in pristine.items():
            (ckpt / original).write_bytes(content)
        craft(ckpt, name, data)
        with pytest.raises(ConfigError) as refused:
            Run(make_config(registry, tmp_path / f"case{i}", *settings(*qwen3, steps=2), backend="hf"), registry, resume=str(ckpt))
        assert message in str(refused.value) and str(ckpt) in str(refused.value) and "\n" not in str(refused.value), str(refused.value)

    # a changed stream is refused like a changed locked key
    for original, content in pristine.items():
        (ckpt / original).write_bytes(content)
    with pytest.raises(ConfigError, match=r"the GRPO stream's settings differ \(seed: 7 -> 8; hf.grpo.num_generations: 4 -> 2\)"):
        Run(make_config(registry, tmp_path / "changed", *settings(*qwen3, steps=2), "seed=8", "hf.grpo.num_generations=2",
                        backend="hf"),
            registry, resume=str(ckpt))

    # through the CLI: a checkpoint without the producer's state (as GRPO wrote them before it could resume)
    craft(ckpt, STATE_FILE, None)
    proc = cli_run(out, *settings(*qwen3, steps=2), resume="auto")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"trainctl: error: checkpoint {ckpt} has no {STATE_FILE} (the GRPO producer's state; "
                                   "checkpoints written before GRPO could resume lack it): start a new run from its "
                                   f"weights with model.name_or_path = '{ckpt}' and --resume never")
