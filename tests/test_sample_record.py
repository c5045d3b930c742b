"""The sample record (``data.record_samples``) across kills: a mixture run killed -9 between
checkpoints and resumed with ``--resume auto`` (the default) trained exactly the samples of an
uninterrupted run, step by step: 0 duplicated, 0 skipped; so did a 2-rank torchrun run killed
whole and resumed by one process (another world size, the same sample order). Off, nothing is
written."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from tests.conftest import run_cli
from tests.live import FAST, LiveRun, sets
from tests.mixture_data import mixture_sets
from trainctl.backends import sample_record

SAVE_EVERY = 10
# a fixed lr schedule (not tied to max_steps), so a run stopped early trains like a longer one
COMMON = [*FAST, "plugin.lr.decay_steps=1000", "train.log_interval=1", "train.eval_interval=0", "train.eval_steps=1",
          f"train.save_interval={SAVE_EVERY}", "data.record_samples=true"]
WEIGHTS = {"plays": 0.6, "more": 0.3, "small": 0.1}
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if e["event"] == "step"}  # a resumed step: its last loss


def samples_by_step(out: Path) -> dict[int, list[tuple[int, str, int]]]:
    """Every sample each step trained, over all ranks' files, sorted by global index."""
    return {step: sorted(s for line in lines for s in zip(line["index"], line["source"], line["offset"]))
            for step, lines in sample_record.read(out).items()}


def last_recorded_step(out: Path) -> int:
    try:
        lines = sample_record.path(out, 0).read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):  # not there yet, or a line half written
        return 0


def kill_between_checkpoints(run: LiveRun, *, kill) -> int:
    """Kill the run once it has trained 3 to 6 steps past a checkpoint (it saves every 10), so
    the record holds steps the checkpoint does not; the step of that checkpoint."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        step = last_recorded_step(run.out)
        if step > SAVE_EVERY and 3 <= step % SAVE_EVERY <= 6:
            kill()
            run.proc.wait(30)
            return step - step % SAVE_EVERY
        assert run.proc.poll() is None, run.output()
        time.sleep(0.002)
    raise AssertionError(f"the run never got there:\n{run.output()}")


def check_every_sample_once(resumed: Path, reference: Path, steps: int, rows_per_step: int) -> None:
    got, expected = samples_by_step(resumed), samples_by_step(reference)
    assert sorted(expected) == list(range(1, steps + 1))
    assert got == expected  # the same samples at every step
    index = [i for step in sorted(got) for i, _, _ in got[step]]
    assert len(index) == len(set(index)) == steps * rows_per_step  # 0 duplicated
    assert index == list(range(steps * rows_per_step))  # 0 skipped


def test_kill_9_between_checkpoints_and_resume_trains_every_sample_once(tmp_path, mixture_sources):
    mix = mixture_sets(mixture_sources, WEIGHTS)
    run = LiveRun(tmp_path / "run", *COMMON, *mix, "train.max_steps=1000000")
    try:
        saved = kill_between_checkpoints(run, kill=lambda: run.proc.send_signal(signal.SIGKILL))
    finally:
        run.close()
    assert run.proc.returncode == -signal.SIGKILL
    trained = max(samples_by_step(run.out))
    assert trained > saved  # steps the checkpoint does not hold are in the record before the resume
    end = trained + 15
    run_cli("run", "--yes", "--out", str(run.out), *sets(*COMMON, *mix, f"train.max_steps={end}"), check=True)
    run_cli("run", "--yes", "--out", str(tmp_path / "ref"), *sets(*COMMON, *mix, f"train.max_steps={end}"), check=True)
    starts = [e for e in map(json.loads, (run.out / "events.jsonl").read_text().splitlines()) if e["event"] == "run_start"]
    assert starts[-1]["resumed_from"].endswith(f"step-{saved:06d}")
    check_every_sample_once(run.out, tmp_path / "ref", end, rows_per_step=8)
    assert losses(run.out) == losses(tmp_path / "ref")  # bit for bit, every step


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def kill_all(run: LiveRun) -> None:
    """SIGKILL to both ranks and torchrun at once (the ranks run in sessions of their own, so a
    signal to the launcher's group misses them), then wait until the ranks are gone: they hold
    the run directory's lock until they are."""
    pid = run.proc.pid
    ranks = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert len(ranks) == 2, ranks
    for p in (*ranks, pid):
        os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(map(alive, ranks)):
        assert time.monotonic() < deadline, "the ranks outlived SIGKILL by 30 s"
        time.sleep(0.05)


def test_two_ranks_killed_whole_resume_on_one_with_the_same_samples(tmp_path, mixture_sources):
    mix = [*mixture_sets(mixture_sources, WEIGHTS), "train.grad_accum=2"]
    run = LiveRun(tmp_path / "run", *COMMON, *mix, "train.max_steps=1000000", model=FAST, launcher=TORCHRUN)
    try:
        saved = kill_between_checkpoints(run, kill=lambda: kill_all(run))
    finally:
        run.close()
    both = sample_record.read(run.out)
    assert {line["rank"] for lines in both.values() for line in lines} == {0, 1}
    trained = max(both)
    assert trained > saved
    end = trained + 10
    run_cli("run", "--yes", "--out", str(run.out), *sets(*COMMON, *mix, f"train.max_steps={end}"), check=True)
    run_cli("run", "--yes", "--out", str(tmp_path / "ref"), *sets(*COMMON, *mix, f"train.max_steps={end}"), check=True)
    check_every_sample_once(run.out, tmp_path / "ref", end, rows_per_step=16)
    after = sample_record.read(run.out)
    assert {line["rank"] for line in after[saved]} == {0, 1} and [line["rank"] for line in after[saved + 1]] == [0]
    got, expected = losses(run.out), losses(tmp_path / "ref")
    assert got.keys() == expected.keys()
    worst = max(abs(got[k] - expected[k]) / abs(expected[k]) for k in got)
    assert worst <= 1e-5, f"largest relative difference {worst:.2e} (2 ranks against 1 process: the sums' order differs)"
    assert all(got[k] == expected[k] for k in got if k > saved)  # one process again: bit for bit


def test_off_by_default_nothing_is_written(tmp_path, mixture_sources):
    run_cli("run", "--yes", "--out", str(tmp_path / "o"), *sets(*FAST, "train.max_steps=3", "train.eval_steps=1",
            *mixture_sets(mixture_sources, WEIGHTS)), check=True)
    assert (tmp_path / "o" / "events.jsonl").exists() and not list((tmp_path / "o").glob("samples-*"))


def test_cut_keeps_the_steps_up_to_the_start_and_drops_a_torn_line(tmp_path):
    file = tmp_path / "samples-rank0.jsonl"
    lines = [json.dumps({"step": s, "rank": 0, "index": [s], "source": ["a"], "offset": [0]}) for s in range(1, 6)]
    file.write_text("\n".join(lines) + "\n" + lines[0][:10])
    sample_record.cut(file, 3)
    assert file.read_text() == "\n".join(lines[:3]) + "\n"
    file.write_text("\n".join(lines[:2]) + "\n" + lines[2][:-3])  # killed inside step 3's line
    sample_record.cut(file, 4)
    assert file.read_text() == "\n".join(lines[:2]) + "\n"
