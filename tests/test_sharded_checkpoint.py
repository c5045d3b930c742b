"""Distributed checkpoints, for real: 2 ranks under torchrun (gloo) on a sharded model.

Under FSDP every rank writes its own shard through DCP into the checkpoint's temporary directory;
the checkpoint is sealed, hashed and ledgered as always, resumes on any number of ranks and under
either strategy (DCP reshards), exports to one safetensors checkpoint, and ``trainctl sample`` /
``eval`` read it directly. A kill -9 during a sharded save, synchronous or async, leaves the
previous checkpoint the newest complete one.

FSDP is ``train.parallel = "fsdp"`` on 2 ranks under torchrun, DDP the same without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli
from tests.live import LiveRun, sets
from tests.test_distributed import LONG, SAME, TORCHRUN, assert_close, env, evals, losses
from trainctl.kernel.checkpoint_files import checkpoints, verify

FSDP = "train.parallel='fsdp'"
ACCUM = "train.grad_accum=2"  # a micro-batch per rank
SHARDS = {".metadata", "__0_0.distcp", "__1_0.distcp"}


def single(out: Path, *overrides: str, resume: Path | None = None) -> None:
    run_cli("run", "--yes", "--out", str(out), *(["--resume", str(resume)] if resume else []),
            *sets(*SAME, ACCUM, *overrides), check=True)


def fsdp(out: Path, *overrides: str, resume: Path | None = None, parallel: str = "fsdp") -> None:
    """A run on 2 ranks: FSDP (default) or DDP (``parallel="ddp"``)."""
    proc = subprocess.run(
        [*TORCHRUN, "-m", "trainctl", "run", "--yes", "--out", str(out), *(["--resume", str(resume)] if resume else []),
         *sets(*SAME, ACCUM, f"train.parallel='{parallel}'", *overrides)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def files(ckpt: Path) -> set[str]:
    return set(json.loads((ckpt / "manifest.json").read_text())["files"])


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> dict[int, float]:
    """The losses of one uninterrupted run, in one process (which FSDP on 2 ranks equals, as DDP
    does); the lr schedule does not depend on max_steps, so every shorter run's losses are these."""
    out = tmp_path_factory.mktemp("ref") / "run"
    single(out, "train.max_steps=80")
    return losses(out)


def upto(ref: dict[int, float], first: int, last: int) -> dict[int, float]:
    return {k: v for k, v in ref.items() if first <= k <= last}


@pytest.fixture
def live(tmp_path):
    runs = []

    def start(name, *overrides):
        run = LiveRun(tmp_path / name, *LONG, ACCUM, FSDP, *overrides, model=[], launcher=TORCHRUN)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def test_sigterm_to_fsdp_saves_shards_that_resume_on_one_and_on_two_ranks(live, tmp_path, ref):
    run = live("run", "train.log_interval=1")
    run.wait(lambda s: s["state"] == "running" and s["step"] >= 3, timeout=120)
    run.proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    run.proc.wait(60)  # torchrun itself exits 1 after a signal; the run says how it ended
    assert (run.status()["state"], run.status()["reason"]) == ("stopped", "signal"), run.output()
    [ckpt] = checkpoints(tmp_path / "run" / "checkpoints")  # one checkpoint, written by both ranks
    step = json.loads((ckpt / "kernel.json").read_text())["state"]["step"]
    assert [(r["step"], r["reason"]) for r in run.ledger()] == [(step, "signal")]
    assert verify(ckpt) is None
    assert SHARDS | {"rng-rank0.pt", "rng-rank1.pt", "model.json"} <= files(ckpt)
    assert "model.safetensors" not in files(ckpt) and "optimizer.pt" not in files(ckpt)

    # FSDP on 2 ranks equals one process, a reduction order apart: the noise of each step adds up
    # over a long run, and when SIGTERM lands is up to the machine, so compare the first 20 steps
    first = min(step, 20)
    assert_close(upto(losses(tmp_path / "run"), 1, first), upto(ref, 1, first))
    # the resumed runs continue as the uninterrupted 2-rank run does, from the same state
    end = f"train.max_steps={step + 2}"
    fsdp(tmp_path / "uninterrupted", end)
    uninterrupted = upto(losses(tmp_path / "uninterrupted"), step + 1, step + 2)
    single(tmp_path / "one", end, resume=ckpt)
    fsdp(tmp_path / "two", end, resume=ckpt)
    assert_close(losses(tmp_path / "one"), uninterrupted)
    assert_close(losses(tmp_path / "two"), uninterrupted)


def test_full_checkpoint_resumes_under_fsdp_and_back_and_exports(tmp_path, ref):
    single(tmp_path / "a", "train.max_steps=2")  # the full layout: model.safetensors + optimizer.pt
    fsdp(tmp_path / "b", "train.max_steps=4", resume=checkpoints(tmp_path / "a" / "checkpoints")[-1])
    [sharded] = checkpoints(tmp_path / "b" / "checkpoints")
    assert SHARDS <= files(sharded)
    fsdp(tmp_path / "c", "train.max_steps=6", resume=sharded, parallel="ddp")  # DDP, 2 ranks
    assert_close(losses(tmp_path / "b"), upto(ref, 3, 4))
    assert_close(losses(tmp_path / "c"), upto(ref, 5, 6))
    assert {"model.safetensors", "optimizer.pt"} <= files(checkpoints(tmp_path / "c" / "checkpoints")[-1])

    # export: one safetensors checkpoint that evaluates as the sharded run did at that step
    out = tmp_path / "export"
    done = run_cli("export", str(sharded), "-o", str(out), check=True)
    assert "step 4" in done.stdout and verify(out) is None
    assert {"model.safetensors", "optimizer.pt", "model.json", "kernel.json"} <= files(out) and not SHARDS & files(out)
    sharded_val = evals(tmp_path / "b")[(4, "val")]
    for target in (out, sharded):  # eval reads the sharded checkpoint directly too
        result = json.loads(run_cli("eval", str(target), "--json", check=True).stdout)
        assert abs(result["val_loss"] - sharded_val) < 1e-5, (target, result, sharded_val)
    texts = [run_cli("sample", str(t), "--max-new-tokens", "20", check=True).stdout for t in (out, sharded)]
    assert texts[0] == texts[1] and len(texts[0]) > 20
    again = run_cli("export", str(sharded), "-o", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr



def kill_ranks(proc: subprocess.Popen) -> None:
    """kill -9 the ranks (torchrun starts each in a session of its own), then torchrun."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in [*map(int, children), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path, ref, mode):
    out = tmp_path / "run"
    overrides = [*LONG, ACCUM, "train.log_interval=1", "train.save_interval=1", f"plugin.checkpoint.async_save={str(mode == 'async').lower()}"]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([*TORCHRUN, "-m", "trainctl", "run", "--yes", "--out", str(out), *sets(*overrides, FSDP)],
                            cwd=ROOT, env=env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root, caught = out / "checkpoints", None
    try:
        deadline = time.monotonic() + 120
        while caught is None and time.monotonic() < deadline and proc.poll() is None:
            done = checkpoints(root)
            # a save under way after one is complete: its temporary directory holds shards
            writing = [p for p in root.glob(".tmp-step-*") if any(p.glob("*.distcp")) or any(p.glob("rng-*"))] if done else []
            if writing:
                kill_ranks(proc)
                caught = writing[0].name
            time.sleep(0.002)
    finally:
        kill_ranks(proc)
        proc.wait()
        log.close()
    assert caught, (tmp_path / "run.log").read_text()[-3000:]
    newest = checkpoints(root)[-1]
    assert verify(newest) is None and SHARDS <= files(newest)
    assert int(caught.removeprefix(".tmp-step-").split("-")[0]) > int(newest.name.removeprefix("step-"))
    step = json.loads((newest / "kernel.json").read_text())["state"]["step"]

    # the next run starts from it (auto), on one rank, and continues exactly
    end = f"train.max_steps={step + 1}"
    run_cli("run", "--yes", "--out", str(out), *sets(*SAME, ACCUM, end), check=True)
    assert not list(root.glob(".tmp-*"))  # the cut-short write was cleared
    assert_close({k: v for k, v in losses(out).items() if k > step}, upto(ref, step + 1, step + 1))


@pytest.mark.parametrize("strategy", ["one process", "fsdp"])
def test_hf_export_loads_with_from_pretrained_and_evaluates_as_the_run(hf, tmp_path, strategy):
    from transformers import AutoModelForCausalLM

    steps = [*hf.sets(None, "train.max_steps=2", "train.eval_interval=2", "plugin.lr.warmup_steps=1")]
    args = ["run", "--yes", "--backend", "hf", *sets(*steps)]
    run_cli(*args, "--out", str(tmp_path / "ref"), check=True)
    if strategy == "fsdp":
        proc = subprocess.run([*TORCHRUN, "-m", "trainctl", *args, "--out", str(tmp_path / "run"),
                               "--set", "train.parallel='fsdp'"], cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert SHARDS <= files(checkpoints(tmp_path / "run" / "checkpoints")[-1])
    run_dir = tmp_path / ("run" if strategy == "fsdp" else "ref")
    out = tmp_path / "export"
    run_cli("export", str(run_dir), "-o", str(out), check=True)
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt"} <= files(out)
    result = json.loads(run_cli("eval", str(out), "--json", check=True).stdout)
    assert abs(result["val_loss"] - evals(run_dir)[(2, "val")]) < 1e-4, result

    # from_pretrained on the export is the model the run trained (the one-process run's own checkpoint)
    ids = torch.arange(4, 60).reshape(1, -1)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = AutoModelForCausalLM.from_pretrained(checkpoints(tmp_path / "ref" / "checkpoints")[-1]).eval()
    with torch.no_grad():
        a, b = (m(input_ids=ids, labels=ids).loss.item() for m in (exported, trained))
    assert abs(a - b) < 1e-4, (a, b)
