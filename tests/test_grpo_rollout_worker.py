"""Rollout workers (``trainctl rollout-worker``, ``hf.grpo.rollout_workers``): real processes, real
HTTP on loopback, the real CLI. A trainer with one worker trains with staleness <= k on every
rollout; a worker killed with -9 is waited for (status "waiting", ``trainctl_rollout_workers_up``
0), restarted with the same command, and the run completes; a stop while it is down still saves;
bad settings are one line; a weights file that is a link out of the folder, a FIFO or a pickle
is refused by the worker."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, run_cli
from tests.live import LiveRun, sets
from tests.test_grpo_async import events, settings
from tests.test_grpo_cli import GOOD, broken_weights, grpo, one_line, prompts  # noqa: F401  (fixtures)
from tests.test_grpo_resume import qwen3  # noqa: F401  (the tiny model and 8 prompts)
from tests.test_grpo_reward_plugins import installed  # noqa: F401  (the xr reward plugins, installed)
from trainctl.backends.hf import rollout_wire
from trainctl.backends.hf.grpo_state import ProducerState


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Worker:
    """``trainctl rollout-worker`` for a run's config, in a subprocess."""

    def __init__(self, model: list[str], port: int, weights: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.env = {**cli_env(), **(env or {})}
        self.command = [sys.executable, "-m", "trainctl", "rollout-worker", "--backend", "hf", "--port", str(port),
                        "--weights", str(weights), *sets(*model)]
        self.log_path, self.port = log, port
        self.start()

    def start(self) -> None:
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_up(self, timeout: float = 180) -> None:
        """Until it answers /health: a trainer asking first would see it down, not sharing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                health(self.port)
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the worker on port {self.port} did not answer within {timeout} s\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


def logged(run: LiveRun) -> str:
    """The run's output, also once it is closed."""
    return (run.out.parent / f"{run.out.name}.log").read_text()


def remote(qwen3, port: int, *, steps: int, plugins: str = '"controller", "checkpoint", "status", "jsonl"') -> list[str]:
    return [*settings(*qwen3, steps=steps, plugins=plugins), f"hf.grpo.rollout_workers=['127.0.0.1:{port}']"]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_one_worker_trains_with_staleness_at_most_k_and_survives_kill_9(qwen3, tmp_path):
    port, out = free_port(), tmp_path / "run"
    steps = 40  # long enough to be killed mid-run (a step is ~0.1 s here)
    config = remote(qwen3, port, steps=steps, plugins='"controller", "checkpoint", "status", "jsonl", "prometheus"')
    config.append("plugin.prometheus.port=0")
    worker = Worker(settings(*qwen3, steps=steps), port, out / "rollout-weights", tmp_path / "worker.log")
    run = LiveRun(out, model=config, args=["--backend", "hf"])
    try:
        run.wait(lambda s: s["state"] == "running" and s["step"] >= 2, timeout=120, poll=0.005)
        worker.kill()  # mid-run: the trainer is waiting on its next batch or about to
        status = run.wait(lambda s: s["state"] == "waiting", timeout=30)
        assert status["rollout"]["workers_up"] == 0 and "unreachable" in status["rollout"]["waiting"], status
        metrics = scrape(status["metrics_address"])
        assert any(line.startswith("trainctl_rollout_workers_up{") and line.endswith(" 0.0")
                   for line in metrics.splitlines()), metrics
        shown = run_cli("status", str(out), timeout=30)
        assert "waiting: rollout worker 127.0.0.1" in shown.stdout, shown.stdout
        worker.start()  # the same command: it goes on from the position the trainer sends
        assert run.exit_code(timeout=180) == 0, run.output()
    finally:
        run.close()
        worker.kill()
    assert "Traceback" not in logged(run) + worker.output()
    # the memory plan: the reference (beta > 0) only; the policy copy is the worker's, in its process
    plan = re.search(r"parameters ([\d.]+ KiB), .*frozen model ([\d.]+ KiB)", logged(run))
    assert plan and plan[1] == plan[2], logged(run)
    rollouts = [e for e in events(out) if e["event"] == "rollout"]
    assert [r["step"] for r in rollouts] == list(range(steps))
    assert all(0 <= r["staleness"] <= 1 for r in rollouts), rollouts
    assert any(r["staleness"] == 1 for r in rollouts)  # the worker generated ahead: the overlap is real
    assert all(r["workers_up"] == 1 for r in rollouts)
    assert run.status()["state"] == "completed"
    kept = sorted(p.name for p in (out / "rollout-weights").iterdir())
    assert kept == [f"weights-v{steps - 1}.safetensors", f"weights-v{steps}.safetensors"]  # the last 2


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        return json.loads(response.read())


def test_two_workers_share_the_batches_by_index(qwen3, tmp_path):
    """Batch n on worker n mod 2: each goes on from the position it is sent, skipping the other's.
    The second's first batch comes 4 s late (tests/tampering_worker.py ``slow``, between trainer
    and worker): the trainer waits for it, in order, rather than take batch 2 first and drop it;
    the second is not reported down while it generates."""
    ports, upstream, out, steps = [free_port(), free_port()], free_port(), tmp_path / "run", 6
    workers = [Worker(settings(*qwen3, steps=steps), port, out / "rollout-weights", tmp_path / f"worker{i}.log")
               for i, port in enumerate([ports[0], upstream])]
    proxy = subprocess.Popen([sys.executable, str(ROOT / "tests" / "tampering_worker.py"), str(ports[1]), str(upstream),
                              "slow"], cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    config = [*settings(*qwen3, steps=steps), f"hf.grpo.rollout_workers={['127.0.0.1:%d' % p for p in ports]}"]
    try:
        for worker in workers:
            worker.wait_up()
        proc = run_cli("run", "--yes", "--backend", "hf", "--out", str(out), *sets(*config), timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        made = [health(worker.port)["next"] for worker in workers]  # the batch each would make next
    finally:
        proxy.kill()
        proxy.wait()
        for worker in workers:
            worker.kill()
    assert made[0] % 2 == 1 and made[1] % 2 == 0 and min(made) >= steps - 1, made  # 0, 2, 4.. and 1, 3, 5..
    found = events(out)
    rollouts = [e for e in found if e["event"] == "rollout"]
    assert [r["step"] for r in rollouts] == list(range(steps))
    assert [e for e in found if e.get("kind") in ("stale_batch_dropped", "rollout_waiting")] == []
    assert rollouts[1]["policy_version"] == 0 and rollouts[1]["staleness"] == 1, rollouts  # batch 1, waited for
    assert all(0 <= r["staleness"] <= 1 for r in rollouts), rollouts
    assert all(r["workers_up"] == 2 for r in rollouts), rollouts


def test_sigterm_while_the_worker_is_down_saves_and_exits(qwen3, tmp_path):
    port, out = free_port(), tmp_path / "run"
    run = LiveRun(out, model=remote(qwen3, port, steps=100), args=["--backend", "hf"])  # no worker ever started
    try:
        status = run.wait(lambda s: s["state"] == "waiting", timeout=120)
        assert status["step"] == 0 and status["rollout"]["workers_up"] == 0
        run.proc.send_signal(signal.SIGTERM)
        assert run.exit_code(timeout=60) == 0, run.output()
    finally:
        run.close()
    assert "Traceback" not in logged(run)
    status = run.status()
    assert status["state"] == "stopped" and status["reason"] == "signal", status
    assert (out / "checkpoints" / "step-000000").is_dir()


@pytest.mark.parametrize("case, overrides, expected", [
    ("not host:port", ["hf.grpo.max_staleness=1", "hf.grpo.rollout_workers=['127.0.0.1']"],
     ("rollout_workers entry '127.0.0.1' is not host:port",)),
    ("port out of range", ["hf.grpo.max_staleness=1", "hf.grpo.rollout_workers=['127.0.0.1:70000']"],
     ("rollout_workers entry '127.0.0.1:70000'",)),
    ("synchronous", ["hf.grpo.rollout_workers=['127.0.0.1:8600']"],
     ("rollout_workers needs max_staleness >= 1", "set max_staleness = 1")),
])
def test_bad_rollout_workers_are_one_line(hf, prompts, broken_weights, tmp_path, case, overrides, expected):
    line = one_line(grpo(hf, tmp_path / "out", prompts, f"hf.grpo.rewards=['{GOOD}']", *overrides, model=broken_weights))
    for part in expected:
        assert part in line, line


def test_the_worker_refuses_a_non_loopback_host_and_a_synchronous_config(qwen3, tmp_path):
    far = run_cli("rollout-worker", "--backend", "hf", "--host", "0.0.0.0", "--port", "0", "--weights",
                  str(tmp_path / "w"), *sets(*settings(*qwen3, steps=1)), timeout=60)
    assert far.returncode == 2 and "not a loopback address" in far.stderr and "Traceback" not in far.stderr, far.stderr
    sync = run_cli("rollout-worker", "--backend", "hf", "--port", "0", "--weights", str(tmp_path / "w"),
                   *sets(*settings(*qwen3, steps=1, k=0)), timeout=120)
    assert sync.returncode == 2 and "max_staleness >= 1" in sync.stderr and "Traceback" not in sync.stderr, sync.stderr


def ask(port: int, n: int, body: bytes | None = None) -> tuple[int, bytes]:
    body = body or rollout_wire.request(n, 0, ProducerState(step=0, generated_version=0, tokens_seen=0, consumed=0,
                                                            pass_start=None, buffered=None))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/batch", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_worker_refuses_a_link_out_of_the_folder_a_fifo_and_a_pickle(qwen3, tmp_path):
    """Versions 3 (a FIFO: opening it must not block), 2 (a pickle) and 1 (a link to a real
    safetensors file outside the folder) are offered, newest first: each is refused, said once,
    and the worker answers 503 (waiting for a version it can trust) rather than loading one. A
    request body that is a pickle, or one asking it to skip a billion batches, is answered 400."""
    from safetensors.torch import save_file
    import torch

    weights, port = tmp_path / "weights", free_port()
    weights.mkdir()
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"x": torch.zeros(2)}, outside)
    (weights / "weights-v1.safetensors").symlink_to(outside)
    (weights / "weights-v2.safetensors").write_bytes(pickle.dumps({"x": [0.0, 0.0]}))
    os.mkfifo(weights / "weights-v3.safetensors")
    worker = Worker(settings(*qwen3, steps=4), port, weights, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 90
        while "listening on" not in worker.output():
            assert worker.proc.poll() is None and time.monotonic() < deadline, worker.output()
            time.sleep(0.1)
        status, body = ask(port, 1)
        assert status == 503 and "no weights of version >= 0" in json.loads(body)["waiting"], body
        assert ask(port, 1)[0] == 503  # asked again: refused files are not read again
        # requests no trainer sends: a pickle, a skip without end
        status, body = ask(port, 0, pickle.dumps({"n": 1}))
        assert status == 400 and "not a safetensors message" in json.loads(body)["error"], body
        status, body = ask(port, 10**9)
        assert status == 400 and "more than 4096 batches past" in json.loads(body)["error"], body
    finally:
        worker.kill()
    refused = [line for line in worker.output().splitlines() if line.startswith("rollout-worker: refused")]
    assert len(refused) == 3, worker.output()
    assert "weights-v3.safetensors is not a regular file" in refused[0]
    assert "weights-v2.safetensors is not a safetensors file" in refused[1] and "never unpickled" in refused[1]
    assert "weights-v1.safetensors is a symbolic link" in refused[2]
    assert "Traceback" not in worker.output()


def test_a_reward_failing_in_the_worker_fails_the_run_in_one_line_naming_it(qwen3, tmp_path):
    port, out = free_port(), tmp_path / "run"
    reward = "tests.grpo_rewards:raises_where_told"  # raises in the worker only: the trainer's own probe passes
    config = [*settings(*qwen3, steps=3), f"hf.grpo.rewards=['{reward}']"]
    worker = Worker(config, port, out / "rollout-weights", tmp_path / "worker.log", env={"TRAINCTL_TEST_GRADER_DOWN": "1"})
    try:
        proc = run_cli("run", "--yes", "--backend", "hf", "--out", str(out),
                       *sets(*config, f"hf.grpo.rollout_workers=['127.0.0.1:{port}']"), timeout=180)
        assert worker.proc.poll() is None  # the worker serves on: the error was the batch's, not its own
    finally:
        worker.kill()
    # a failure mid-run: the run ends as failed (exit 1), its reason the worker's line
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("trainctl: run failed at step 0: ") and f"rollout worker 127.0.0.1:{port}: " in line and \
        f"reward '{reward}' raised RuntimeError: the grader is down" in line, line


def test_ctl_stop_then_resume_with_the_same_worker_goes_on_from_the_saved_position(qwen3, tmp_path):
    """The worker ran ahead of the stopped run; the resumed trainer sends the saved position and
    the worker goes back to it (pending batches regenerated from the saved policy)."""
    port, out = free_port(), tmp_path / "run"
    worker = Worker(settings(*qwen3, steps=100), port, out / "rollout-weights", tmp_path / "worker.log")
    run = LiveRun(out, model=remote(qwen3, port, steps=10_000), args=["--backend", "hf"])
    try:
        run.wait(lambda s: s["state"] == "running" and s["step"] >= 3, timeout=120)
        stop = run_cli("ctl", str(out), "stop", timeout=60)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert run.exit_code() == 0, logged(run)
        stopped = run.status()["step"]
        resumed = run_cli("run", "--yes", "--backend", "hf", "--out", str(out), "--resume", "auto",
                          *sets(*remote(qwen3, port, steps=stopped + 3)), timeout=180)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        run.close()
        worker.kill()
    assert f"resume at step {stopped}" in resumed.stdout
    rollouts = [e for e in events(out) if e["event"] == "rollout"]
    assert [r["step"] for r in rollouts] == [stopped, stopped + 1, stopped + 2]
    assert rollouts[0]["staleness"] == 0 and rollouts[0]["policy_version"] == stopped
    assert all(r["staleness"] <= 1 for r in rollouts)


@pytest.mark.parametrize("mode, expected", [
    ("vocab", "completion_ids holds ids outside the vocabulary of"),
    ("future", "of version 100"),
])
def test_a_batch_no_trainer_can_train_on_fails_the_run_in_one_line(qwen3, tmp_path, mode, expected):
    """A process on the listed port that hands out altered batches (tests/tampering_worker.py,
    between the trainer and a real worker): each batch is checked as a checkpoint's buffer is, and
    its version against what the trainer has written; the run fails at once, naming the worker."""
    upstream, port, out = free_port(), free_port(), tmp_path / "run"
    config = settings(*qwen3, steps=3)
    worker = Worker(config, upstream, out / "rollout-weights", tmp_path / "worker.log")
    proxy = subprocess.Popen([sys.executable, str(ROOT / "tests" / "tampering_worker.py"), str(port), str(upstream), mode],
                             cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        proc = run_cli("run", "--yes", "--backend", "hf", "--out", str(out),
                       *sets(*config, f"hf.grpo.rollout_workers=['127.0.0.1:{port}']"), timeout=240)
    finally:
        proxy.kill()
        proxy.wait()
        worker.kill()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("trainctl: run failed at step 0: ") and f"rollout worker 127.0.0.1:{port} answered" in line \
        and expected in line, line
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step-*"))  # nothing trained on it


def test_read_batch_refuses_masks_nan_and_another_shape():
    """The wire's own checks, on batches made here: a mask of 2, NaN advantages, a micro-batch of
    another batch size, a non-tensor input, a tensor TRL would pass to the model unasked, more
    micro-batches than the run's."""
    import torch

    from trainctl.backends.hf.grpo_offpolicy import Generated
    from trainctl.backends.hf.grpo_state import Expected

    def micro(b: int = 4) -> dict:
        return {"prompt_ids": torch.ones(b, 5, dtype=torch.long), "prompt_mask": torch.ones(b, 5, dtype=torch.long),
                "completion_ids": torch.ones(b, 3, dtype=torch.long), "completion_mask": torch.ones(b, 3, dtype=torch.long),
                "advantages": torch.zeros(b), "num_items_in_batch": torch.tensor(12),
                "sampling_per_token_logps": torch.full((b, 3), -1.0)}

    expected = Expected(settings={}, defaults={}, batch_size=4, micro_batches=2, max_completion_length=8,
                        vocab_size=100, passes=4, shuffles=True)
    position = ProducerState(step=2, generated_version=0, tokens_seen=0, consumed=1, pass_start=None, buffered=None)

    def wire(*micros: dict) -> bytes:
        return rollout_wire.batch(Generated(micro=list(micros), version=0, metrics={}, position=position, generation_s=0.1))

    assert len(rollout_wire.read_batch(wire(micro(), micro()), "cpu", expected).micro) == 2  # a good one passes
    bad_mask, nan, other = micro(), micro(), micro(b=3)
    bad_mask["completion_mask"][1, 2] = 2
    nan["advantages"][0] = float("nan")
    cases = {"completion_mask holds values other than 0 and 1": wire(micro(), bad_mask),
             "advantages holds NaN or infinite values": wire(nan, micro()),
             "are not (4, length)": wire(other, micro()),
             "holds values that are not tensors": wire(micro(), {**micro(), "advantages": [0.0] * 4}),
             "holds 'pixel_values', which no micro-batch of this run has": wire(*[{**micro(), "pixel_values": torch.zeros(4)}] * 2),
             "3 micro-batches, not this run's 2": wire(micro(), micro(), micro())}
    for problem, data in cases.items():
        with pytest.raises(ValueError, match=re.escape(problem)):
            rollout_wire.read_batch(data, "cpu", expected)


def test_a_reward_plugin_scores_in_the_worker(installed, qwen3, tmp_path):
    """A third-party reward plugin (tests/test_grpo_reward_plugins.py's ``xr``, installed through
    the entry point) named in hf.grpo.rewards is built in the worker from the same config and
    scores its generations; the trainer logs its reward under the plugin's name."""
    from tests import hf_assets

    port, out = free_port(), tmp_path / "run"
    rows = hf_assets.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": speech[:40], "answer": speaker}
                                                              for speaker, speech in hf_assets.speeches(8)])
    config = [*settings(qwen3[0], rows, steps=3, plugins='"jsonl", "other", "length"'),
              "hf.grpo.rewards=['length', 'tests.grpo_rewards:e_share']", "hf.grpo.reward_weights=[1.0, 0.5]"]
    worker = Worker(config, port, out / "rollout-weights", tmp_path / "worker.log")
    try:
        proc = run_cli("run", "--yes", "--backend", "hf", "--out", str(out),
                       *sets(*config, f"hf.grpo.rollout_workers=['127.0.0.1:{port}']"), timeout=240)
    finally:
        worker.kill()
    assert proc.returncode == 0, proc.stderr[-3000:] + worker.output()[-2000:]
    steps = [e["metrics"] for e in events(out) if e["event"] == "step"]
    assert len(steps) == 3 and all(m["rewards/length/mean"] > 0 for m in steps)
    assert all(m["reward"] == pytest.approx(m["rewards/length/mean"] + 0.5 * m["rewards/tests.grpo_rewards:e_share/mean"])
               for m in steps)
