"""GRPO on 2 ranks (DDP or FSDP2, torchrun, gloo) is one process: TRL's own multi-process logic
does the sharing (its dataloader hands each rank its slice of every RepeatSampler generation
batch, the rewards are gathered and the advantages normalised over all of them,
``num_items_in_batch`` is global), the kernel's DDP or FSDP wrapper reduces the gradients. Under
FSDP the sharded policy generates (each token's forward all-gathers the layers; transformers'
``synced_gpus`` keeps a rank whose completions ended running the others' forwards).

- 2 ranks x 4 micro-batches equal 1 process x 8 (the same ``train.grad_accum = 8``): loss, KL
  (beta > 0), rewards, entropy and gradient norm within 1e-5 relative over 5 steps. Sampling is
  made rank-independent by ``tests/quantile_sampling_rank.py`` (its docstring says why sampled
  runs cannot be compared and why greedy decoding would compare zeros). One completion per
  micro-batch: TRL logs KL, entropy and the clip ratios as a mean of micro-batch means, and its
  shuffle of a generation (each rank's own RNG) makes different micro-batches on 2 ranks than in
  one process; with one completion each, that mean is the mean over the completions either way.
  The loss and gradients (``dapo``: normalised by the global token count) do not depend on it.
- Stopped at 2 ranks (DDP and FSDP) in the middle of a buffered generation and resumed at 2, with sampling as
  it is: bit-identical to the uninterrupted run (each rank its buffer and its RNG); resumed on
  another number of ranks: one line, exit 2.
- FSDP with completions of uneven length (``QUANTILE_EOS``): loss, rewards, lengths and gradient
  norm within 1e-5 of one process (KL and entropy are pooled differently, see the test).
- A ``steps_per_generation`` the ranks do not divide, ``max_staleness`` on several ranks: one
  line, exit 2, before the model loads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import hf_assets
from tests.conftest import ROOT, cli_env
from tests.live import sets

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
ONE = [sys.executable]
SAMPLER = str(ROOT / "tests" / "quantile_sampling_rank.py")
GROUP = 4
COMPARED = ("loss", "kl", "reward", "reward_std", "entropy", "grad_norm", "completions/mean_length")
TOLERANCE = 1e-5  # relative; float32 on CPU, the ranks' matmuls over other batch sizes than one process's
FLOOR = 1e-7  # absolute, for values that are 0 in exact arithmetic (step 1's loss: advantages sum to 0, KL 0)


@pytest.fixture(scope="module")
def qwen3(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_ddp")
    return hf_assets.grpo_assets(root, hf.tokenizer, 16)


def settings(model: Path, prompts: Path, *extra: str) -> list[str]:
    return [
        'plugins=["checkpoint", "jsonl"]', "seed=7", f"model.name_or_path='{model}'", f"data.train='{prompts}'",
        "model.max_length=128", "train.batch_size=1", "train.grad_accum=8", "train.device='cpu'", "train.threads=1",
        "train.log_interval=1", "train.eval_interval=0", "optim.lr=1e-3", "optim.weight_decay=0.0",
        "hf.objective='grpo'", "hf.grpo.rewards=['tests.grpo_rewards:e_share']", f"hf.grpo.num_generations={GROUP}",
        "hf.grpo.max_completion_length=8", "hf.grpo.beta=0.04", "hf.grpo.loss_type='dapo'", *extra,
    ]


def launch(launcher: list[str], entry: list[str], out: Path, overrides: list[str], resume: str = "never",
           eos: int | None = None):
    env = cli_env() | {"OMP_NUM_THREADS": "1", "QUANTILE_GROUP": str(GROUP)} | ({"QUANTILE_EOS": str(eos)} if eos else {})
    return subprocess.run([*launcher, *entry, "run", "--yes", "--backend", "hf", "--out", str(out), "--resume", resume,
                           *sets(*overrides)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def steps(out: Path) -> dict[int, dict]:
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return {e["step"]: e | e["metrics"] for e in events if e["event"] == "step"}


def rollouts(out: Path) -> dict[int, tuple[int, int, bool]]:
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return {e["step"]: (e["completions"], e["tokens"], e["reused"]) for e in events if e["event"] == "rollout"}


def errors(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("trainctl: error")]


@pytest.mark.parametrize(("parallel", "uneven"), [("ddp", False), ("fsdp", True)])
def test_two_ranks_equal_one_process(qwen3, tmp_path, parallel, uneven):
    """``uneven``: completions end early at prompt-dependent places, so each rank's generation has
    its own length (FSDP's generate must run the longest rank's forwards on every rank). TRL logs
    KL and entropy per micro-batch as a token mean pooled over the ranks' micro-batches
    (``global_masked_mean``), one completion's in one process: with uneven lengths those two means
    differ by construction, so only the loss, rewards, lengths and gradient are compared then."""
    overrides = settings(*qwen3, "train.max_steps=5")
    eos = json.loads((qwen3[0] / "config.json").read_text())["eos_token_id"] if uneven else None
    ok(launch(ONE, [SAMPLER], tmp_path / "one", overrides, eos=eos))
    ok(launch(TORCHRUN, [SAMPLER], tmp_path / "ranks", [*overrides, f"train.parallel='{parallel}'"], eos=eos))
    one, ranks = steps(tmp_path / "one"), steps(tmp_path / "ranks")
    assert sorted(one) == sorted(ranks) == [1, 2, 3, 4, 5]
    compared = [name for name in COMPARED if not (uneven and name in ("kl", "entropy"))]
    worst = {}
    for name in compared:
        for step in one:
            a, b = one[step][name], ranks[step][name]
            assert abs(a - b) <= TOLERANCE * max(abs(a), abs(b)) + FLOOR, (name, step, a, b)
            worst[name] = max(worst.get(name, 0.0), abs(a - b) / max(abs(a), abs(b), FLOOR))
    print(f"GRPO 2 ranks ({parallel}) vs 1 process, largest relative difference:", {k: f"{v:.1e}" for k, v in worst.items()})
    lengths = [one[s]["completions/mean_length"] for s in one]
    assert (min(lengths) < 8) if uneven else (lengths == [8.0] * 5), lengths
    # not trivially equal: the policy moved away from the reference and the rewards differ in a group
    assert all(one[s]["grad_norm"] > 0.1 and one[s]["reward_std"] > 0 for s in one) and one[5]["kl"] > 1e-3
    # the step's completions and tokens are both ranks' (gathered), as one process counts them
    assert rollouts(tmp_path / "ranks") == rollouts(tmp_path / "one")
    assert all(n == 8 for n, _, _ in rollouts(tmp_path / "ranks").values())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_resume_exactly_and_another_world_size_is_refused(qwen3, tmp_path, parallel):
    """Sampling as it is (each rank its own stream); each generation trained on for 2 steps, so the
    stop at step 3 leaves half of every rank's buffer for step 4."""
    common = ["hf.grpo.num_iterations=2", f"train.parallel='{parallel}'"]
    ok(launch(TORCHRUN, ["-m", "trainctl"], tmp_path / "whole", settings(*qwen3, *common, "train.max_steps=6")))
    ok(launch(TORCHRUN, ["-m", "trainctl"], tmp_path / "split", settings(*qwen3, *common, "train.max_steps=3")))
    ckpt = tmp_path / "split" / "checkpoints" / "step-000003"
    assert {"grpo_state.safetensors", "grpo_state-rank1.safetensors"} <= set(json.loads((ckpt / "manifest.json").read_text())["files"])
    assert json.loads((ckpt / "grpo_state.json").read_text())["world_size"] == 2
    resumed = launch(TORCHRUN, ["-m", "trainctl"], tmp_path / "split", settings(*qwen3, *common, "train.max_steps=6"),
                     resume="auto")
    ok(resumed)
    assert "resume at step 3" in resumed.stdout
    whole, split = steps(tmp_path / "whole"), steps(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4, 5, 6]
    for name in ("loss", "grad_norm", "kl", "entropy", "clip_ratio/region_mean", "num_tokens"):
        assert [split[s].get(name) for s in range(4, 7)] == [whole[s].get(name) for s in range(4, 7)], name
    assert rollouts(tmp_path / "split")[3][2]  # step 4 trained on the checkpoint's buffers
    assert whole[4]["grad_norm"] > 0

    proc = launch(ONE, ["-m", "trainctl"], tmp_path / "split", settings(*qwen3, *common, "train.max_steps=8"),
                  resume="auto")
    newest = tmp_path / "split" / "checkpoints" / "step-000006"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"trainctl: error: cannot resume from {newest}: GRPO wrote it on 2 rank(s) and this run has 1 (each rank's "
        "buffered generation and place in the prompts are its own); resume with 2, or start a new run from its "
        f"weights with model.name_or_path = '{newest}' and --resume never"]


@pytest.mark.parametrize(("extra", "words"), [
    (["hf.grpo.steps_per_generation=3", "train.batch_size=4"], "hf.grpo.steps_per_generation 3 must be a multiple of the 2 ranks"),
    (["hf.grpo.max_staleness=1", "hf.grpo.steps_per_generation=8"], "it does not support 2 ranks"),
], ids=["steps_per_generation", "max_staleness"])
def test_what_two_ranks_cannot_run_is_one_line_before_the_model_loads(qwen3, tmp_path, extra, words):
    model = tmp_path / "broken"
    shutil.copytree(qwen3[0], model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file" * 64)  # read only if the model loads
    proc = launch(TORCHRUN, ["-m", "trainctl"], tmp_path / "out", settings(model, qwen3[1], "train.max_steps=1", *extra))
    found = errors(proc)
    assert len(found) == 1 and words in found[0], proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr and "safetensors" not in found[0]
