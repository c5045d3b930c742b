"""Loggers and inspection plugins: console (ETA under eval, save and pause), csv, tensorboard,
samples, layer_stats, missing optional packages; and every logger at once through the real CLI
(wandb offline included)."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest

from tests.conftest import TINY_GPT, make_config, run_cli
from trainctl.hooks import RunInfo
from trainctl.hooks.events import CheckpointSaved, EvalEnd, Notice, RunStart, StepEnd
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run import Run
from trainctl.plugins.console import Config as ConsoleConfig, Console
from trainctl.plugins.csv import Config as CsvConfig, CsvLogger


def events_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def step(n: int, step_time: float = 0.1, logged: bool = True) -> StepEnd:
    return StepEnd(step=n, max_steps=100, lr=1e-3, tokens=n * 8, step_time=step_time, logged=logged,
                   loss=2.0 if logged else None, tokens_per_s=80.0 if logged else None, time=0.0)


def test_console_eta_counts_steps_evals_and_saves_but_not_pauses(tmp_path):
    stream = Terminal()
    console = Console(ConsoleConfig(format="json"), RunInfo(run_name="r", backend="b", out_dir=tmp_path, max_steps=100),
                      stream=stream)
    console.trainctl_run_start(RunStart(run_name="r", backend="b", out_dir="o", start_step=0, max_steps=100,
                                        params=1, tokens_per_step=8, time=0.0))
    for n in (10, 20):
        console.trainctl_step_end(step(n))
        console.trainctl_eval_end(EvalEnd(step=n, split="val", loss=1.0, duration=2.0, time=0.0))
        console.trainctl_checkpoint_saved(CheckpointSaved(step=n, path="p", reason="interval", duration=1.0, time=0.0))
    # 80 steps left at 0.1 s, 8 evaluations at 2 s and 8 interval saves at 1 s
    assert console.eta() == pytest.approx(80 * 0.1 + 8 * 2.0 + 8 * 1.0)
    console.trainctl_notice(Notice(step=20, kind="paused", message="training paused", time=0.0))
    assert stream.getvalue().rstrip().endswith("20/100  20% paused")  # the bar stops counting down
    console.trainctl_notice(Notice(step=20, kind="resumed", message="training resumed", data={"paused_s": 3600.0}, time=0.0))
    assert console.eta() == pytest.approx(32.0)  # an hour paused changes nothing
    console.trainctl_step_end(step(21, logged=False))
    assert "eta 32s" in stream.getvalue().splitlines()[-1]
    lines = [json.loads(l.split("\x1b[K")[-1]) for l in stream.getvalue().splitlines() if '"event"' in l]
    assert [l["event"] for l in lines if l["event"] in ("paused", "resumed")] == ["paused", "resumed"]
    assert lines[-1]["message"] == "training resumed"


def test_console_eval_line_names_the_batch_mean_and_the_metrics(tmp_path):
    stream = io.StringIO()
    console = Console(ConsoleConfig(format="json"), RunInfo(run_name="r", backend="b", out_dir=tmp_path, max_steps=100),
                      stream=stream)
    console.trainctl_eval_end(EvalEnd(step=10, split="val", loss=1.23456, loss_mean="batches", time=0.0,
                                      metrics={"accuracy": 0.5, "top5_accuracy": 0.812345}))
    console.trainctl_eval_end(EvalEnd(step=10, split="val", loss=1.5, source="remote", loss_mean="batches", time=0.0))
    console.trainctl_eval_end(EvalEnd(step=20, split="val", loss=1.0, time=0.0))
    local, remote, tokens = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (local["loss"], local["loss_mean"], local["top5_accuracy"], local["accuracy"]) == (1.2346, "batches", 0.8123, 0.5)
    assert (remote["source"], remote["loss_mean"]) == ("remote", "batches")
    assert "loss_mean" not in tokens  # the token mean is the default: not repeated on every line


def test_console_eta_uses_wall_time_per_step_less_evals_saves_and_pauses(tmp_path):
    """Per-step work outside the kernel's step time (samples, hooks) counts; evaluations,
    saves and pauses between logged steps do not inflate the per-step time."""
    console = Console(ConsoleConfig(format="json"), RunInfo(run_name="r", backend="b", out_dir=tmp_path, max_steps=100),
                      stream=io.StringIO())
    t = 1000.0
    console.trainctl_step_end(StepEnd(step=10, max_steps=100, lr=1.0, tokens=0, step_time=0.1, logged=True, loss=1.0, time=t))
    console.trainctl_eval_end(EvalEnd(step=10, split="train", loss=1.0, duration=5.0, time=t))
    console.trainctl_eval_end(EvalEnd(step=10, split="val", loss=1.0, duration=5.0, time=t))  # the same evaluation
    console.trainctl_notice(Notice(step=12, kind="resumed", data={"paused_s": 600.0}, time=t))
    # 10 steps of 0.15 s wall (0.1 s in the kernel + 0.05 s of samples), a 5 s evaluation, a 10 min pause
    console.trainctl_step_end(StepEnd(step=20, max_steps=100, lr=1.0, tokens=0, step_time=0.1, logged=True, loss=1.0,
                                      time=t + 10 * 0.15 + 5.0 + 600.0))
    assert console.step_time == pytest.approx(0.15)
    console.trainctl_eval_end(EvalEnd(step=20, split="val", loss=1.0, duration=5.0, time=t))
    assert console.eta() == pytest.approx(80 * 0.15 + 8 * 5.0)


def test_console_prints_samples_and_notices_with_messages(tmp_path):
    stream = io.StringIO()
    console = Console(ConsoleConfig(format="json"), RunInfo(run_name="r", backend="b", out_dir=tmp_path, max_steps=10),
                      stream=stream)
    console.trainctl_notice(Notice(step=0, kind="metrics", message="serving http://127.0.0.1:1/metrics", time=0.0))
    console.trainctl_notice(Notice(step=5, kind="samples", data={"prompts": ["A", "B"], "texts": ["xy", "zw"]}, time=0.0))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0] == {"step": 0, "message": "serving http://127.0.0.1:1/metrics", "event": "metrics", "timestamp": lines[0]["timestamp"]}
    assert [(l["event"], l["prompt"], l["text"]) for l in lines[1:]] == [("sample", "A", "xy"), ("sample", "B", "zw")]


def test_csv_one_row_per_logged_step_with_its_evaluations(registry, tmp_path):
    out = tmp_path / "out"
    config = make_config(registry, out, 'plugins=["checkpoint", "script", "csv"]', "train.max_steps=8",
                         "train.log_interval=2", "train.eval_interval=4", "plugin.script.stop_at=[6]")
    assert Run(config, registry, resume="never").fit().step == 6
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2", "4", "6"]
    assert rows[1]["eval_val_loss"] == str(2.0 / 5) and rows[0]["eval_val_loss"] == ""
    assert float(rows[2]["loss"]) == pytest.approx(10 / 6) and rows[2]["tokens"] == "48"
    # the stop at 6 saved a checkpoint; a resume trains 7..8 and appends, each step once
    config = make_config(registry, out, 'plugins=["checkpoint", "csv"]', "train.max_steps=8",
                         "train.log_interval=2", "train.eval_interval=4")
    assert Run(config, registry, resume="auto").fit().step == 8
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2", "4", "6", "8"] and rows[3]["eval_train_loss"] == str(1.0 / 9)


def test_csv_new_column_rewrites_the_header_and_resume_drops_the_lost_future(tmp_path):
    info = RunInfo(run_name="r", backend="b", out_dir=tmp_path, max_steps=10)
    logger = CsvLogger(CsvConfig(), info)
    logger.trainctl_run_start(RunStart(run_name="r", backend="b", out_dir="o", start_step=0, max_steps=10,
                                       params=1, tokens_per_step=8, time=0.0))
    logger.trainctl_step_end(step(2))
    logger.trainctl_step_end(StepEnd(step=4, max_steps=10, lr=1.0, tokens=32, step_time=0.1, logged=True, loss=1.0,
                                     metrics={"z_loss": 0.5}, time=0.0))
    logger.trainctl_step_end(step(6))
    logger.file.close()  # a crash: no run_end, the pending row for step 6 is lost
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(r["step"], r["z_loss"]) for r in rows] == [("2", ""), ("4", "0.5")]
    resumed = CsvLogger(CsvConfig(), info)
    resumed.trainctl_run_start(RunStart(run_name="r", backend="b", out_dir="o", start_step=2, max_steps=10,
                                        params=1, tokens_per_step=8, time=0.0))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2"] and "z_loss" in rows[0]


def test_samples_every_n_steps_and_at_the_end(registry, tmp_path):
    out = tmp_path / "out"
    config = make_config(registry, out, 'plugins=["samples", "jsonl"]', "train.max_steps=5",
                         "plugin.samples.every=2", 'plugin.samples.prompts=["abc", "xyz"]')
    Run(config, registry, resume="never").fit()
    samples = [e for e in events_of(out) if e["event"] == "notice" and e["kind"] == "samples"]
    assert [s["step"] for s in samples] == [2, 4, 5]
    assert samples[0]["data"] == {"prompts": ["abc", "xyz"], "texts": ["cba", "zyx"]}  # the fake backend reverses


def test_tensorboard_event_files_read_back(registry, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    config = make_config(registry, out, 'plugins=["checkpoint", "samples", "tensorboard"]', "train.max_steps=6",
                         "train.log_interval=2", "train.eval_interval=3", "plugin.samples.every=3",
                         'plugin.samples.prompts=["hello"]')
    Run(config, registry, resume="never").fit()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [(e.step, round(e.value, 4)) for e in loss] == [(2, 5.0), (4, 2.5), (6, round(10 / 6, 4))]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [3, 6]
    assert [e.step for e in acc.Scalars("checkpoint/save_s")] == [6]
    texts = acc.Tensors("samples/0/text_summary")
    assert [t.step for t in texts] == [3, 6] and b"helloolleh" in texts[0].tensor_proto.string_val[0]


@pytest.mark.parametrize(("plugin", "module", "extra"), [("tensorboard", "tensorboard", "tensorboard"),
                                                         ("wandb", "wandb", "wandb")])
def test_missing_optional_package_names_the_extra(registry, tmp_path, monkeypatch, plugin, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    config = make_config(registry, tmp_path / "out", f'plugins=["{plugin}"]')
    with pytest.raises(ConfigError) as error:
        Run(config, registry, resume="never")
    assert str(error.value) == f"plugin '{plugin}' needs the {module} package: pip install 'trainctl[{extra}]'"


def test_gpt_layer_stats_are_per_layer_norms_with_this_steps_gradients(registry, tmp_path):
    import torch

    config = make_config(registry, tmp_path / "out", *TINY_GPT, "plugins=[]", "train.max_steps=2", "train.eval_steps=1", backend="gpt")
    session = Run(config, registry, resume="never")
    session.fit()
    stats = session.backend.layer_stats()
    groups = ["embedding", "layer.0", "layer.1", "head"]
    assert sorted(stats) == sorted(f"{g}.{s}" for g in groups for s in ("weight_norm", "grad_norm"))
    model = session.backend.raw_model
    block = torch.cat([p.detach().flatten() for p in model.transformer.h[1].parameters()])
    assert stats["layer.1.weight_norm"] == pytest.approx(block.norm().item(), rel=1e-5)
    grads = torch.cat([p.grad.flatten() for p in model.transformer.h[0].parameters()])
    assert stats["layer.0.grad_norm"] == pytest.approx(grads.norm().item(), rel=1e-5) and stats["layer.0.grad_norm"] > 0


def test_every_logger_through_the_cli(tmp_path, monkeypatch):
    """A gpt run with samples, layer_stats, csv, tensorboard and wandb (offline): every output
    lands under the run directory, none in the home directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    args = [*TINY_GPT, "train.max_steps=20", "train.log_interval=5", "train.eval_interval=10", "train.eval_steps=2",
            "plugin.lr.warmup_steps=2", "plugin.samples.every=10", "plugin.samples.max_new_tokens=30",
            'plugin.samples.prompts=["ROMEO:"]', "plugin.layer_stats.every=10", "plugin.wandb.project='tests'",
            'plugin.wandb.tags=["ci"]',
            'plugins=["lr", "checkpoint", "samples", "layer_stats", "console", "jsonl", "csv", "tensorboard", "wandb"]']
    proc = run_cli("run", "--yes", "--out", str(out), *[a for item in args for a in ("--set", item)], check=True)
    assert "sample" in proc.stdout and "ROMEO:" in proc.stdout

    events = events_of(out)
    samples = [e for e in events if e["event"] == "notice" and e["kind"] == "samples"]
    assert [s["step"] for s in samples] == [10, 20]
    assert samples[0]["data"]["prompts"] == ["ROMEO:"] and len(samples[0]["data"]["texts"][0]) == 30
    layers = [e for e in events if e["event"] == "notice" and e["kind"] == "layer_stats"]
    assert [l["step"] for l in layers] == [10, 20] and layers[0]["data"]["layer.1.grad_norm"] > 0

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["step"] for r in rows] == ["5", "10", "15", "20"] and rows[1]["eval_val_loss"]

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("layers/layer.0.grad_norm")] == [10, 20]
    assert [e.step for e in acc.Tensors("samples/0/text_summary")] == [10, 20]

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((out / "wandb").iterdir())

    # a resume continues the same wandb run (its id is in the checkpoint) and appends to the csv
    run_cli("run", "--yes", "--out", str(out), *[a for item in args for a in ("--set", item)],
            "--set", "train.max_steps=25", check=True)
    ids = {path.name.rsplit("-", 1)[1] for path in (out / "wandb").glob("offline-run-*")}
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    assert [r["step"] for r in csv.DictReader(open(out / "metrics.csv"))] == ["5", "10", "15", "20", "25"]
    assert not list(home.rglob("*")), f"wandb wrote into the home directory: {list(home.rglob('*'))}"
