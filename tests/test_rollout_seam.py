"""The kernel's rollout seam (``trainctl.kernel.rollout``) on the fake backend: a producer's
batches train the steps, each tagged with its policy version; a batch older than
``max_staleness`` is dropped, counted and announced; the weights are published after every
update; loggers see it all. A dataset backend never touches the seam."""

from __future__ import annotations

import json

from tests import recording_plugins
from tests.conftest import make_config, run_cli
from trainctl.hooks import notices
from trainctl.hooks.events import Notice, RolloutReceived, WeightsPublished
from trainctl.kernel.run import Run


def rollout_run(registry, tmp_path, *overrides: str) -> tuple[Run, object]:
    config = make_config(registry, tmp_path / "out", 'plugins=["recorder", "jsonl"]', "train.max_steps=6",
                         "train.log_interval=2", *overrides, backend="fake_rollout")
    run = Run(config, registry, resume="never")
    return run, run.fit()


def test_a_synchronous_producer_trains_every_step_and_gets_every_version(registry, tmp_path):
    run, result = rollout_run(registry, tmp_path)
    assert result.status == "completed" and result.step == 6
    backend = run.backend
    assert backend.trained_on == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert backend.producer.asked == [(s, s) for s in range(6)]  # the policy version is the steps taken
    assert backend.producer.published == [1, 2, 3, 4, 5, 6]
    recorder = recording_plugins.INSTANCES["recorder"]
    order = [name for name, _ in recorder.calls if name in ("rollout", "weights_published", "step")]
    assert order == ["rollout", "weights_published", "step"] * 6  # received, trained, published, then the step event
    received = [e for e in recorder.events if isinstance(e, RolloutReceived)]
    assert [(e.step, e.policy_version, e.staleness, e.completions, e.tokens) for e in received] == [
        (s, s, 0, 4, 12) for s in range(6)]
    assert received[0].stats == {"reward": 0.5}
    published = [e for e in recorder.events if isinstance(e, WeightsPublished)]
    assert [(e.step, e.version) for e in published] == [(s, s) for s in range(1, 7)]
    lines = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert [line["policy_version"] for line in lines if line["event"] == "rollout"] == list(range(6))
    assert [line["version"] for line in lines if line["event"] == "weights_published"] == list(range(1, 7))


def test_a_batch_older_than_max_staleness_is_dropped_counted_and_announced(registry, tmp_path):
    # the producer's 2nd and 3rd batches are 2 versions behind, the 4th one behind: k = 1 keeps the 4th
    run, result = rollout_run(registry, tmp_path, "model.max_staleness=1", "model.lag=[0, 2, 2, 1]")
    assert result.status == "completed" and result.step == 6
    backend = run.backend
    assert len(backend.producer.asked) == 8 and len(backend.trained_on) == 6
    recorder = recording_plugins.INSTANCES["recorder"]
    dropped = [e for e in recorder.events if isinstance(e, Notice) and e.kind == notices.STALE_BATCH_DROPPED]
    assert [(e.step, e.data["policy_version"], e.data["staleness"], e.data["dropped"]) for e in dropped] == [
        (1, -1, 2, 1), (1, -1, 2, 2)]
    received = [e for e in recorder.events if isinstance(e, RolloutReceived)]
    assert [e.staleness for e in received] == [0, 1, 0, 0, 0, 0]
    assert max(e.staleness for e in received) <= 1  # never more than k


def test_status_json_shows_the_last_rollout_and_the_drops(registry, tmp_path):
    rollout_run(registry, tmp_path, "model.max_staleness=1", "model.lag=[0, 2, 2, 1]", 'plugins=["recorder", "status"]')
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    rollout = status["rollout"]
    assert (rollout["policy_version"], rollout["staleness"], rollout["dropped"]) == (5, 0, 2)
    assert rollout["generation_s"] >= 0
    shown = run_cli("status", str(tmp_path / "out"), check=True).stdout
    assert "rollout    policy version 5, staleness 0, 2 stale batches dropped" in shown


def test_a_dataset_run_has_no_rollout_in_status_json(registry, tmp_path):
    config = make_config(registry, tmp_path / "out", 'plugins=["status"]', "train.max_steps=2")
    Run(config, registry, resume="never").fit()
    assert json.loads((tmp_path / "out" / "status.json").read_text())["rollout"] is None


def test_a_dataset_backend_has_no_producer(registry, tmp_path):
    config = make_config(registry, tmp_path / "out", 'plugins=["recorder"]', "train.max_steps=3")
    run = Run(config, registry, resume="never")
    run.fit()
    names = {name for name, _ in recording_plugins.INSTANCES["recorder"].calls}
    assert "rollout" not in names and "weights_published" not in names


def test_prometheus_exports_the_rollout_metrics_of_a_rollout_run(registry, tmp_path):
    from prometheus_client import generate_latest

    from trainctl.hooks.plugin import RunInfo
    from trainctl.plugins.prometheus import Config, PrometheusExporter

    exporter = PrometheusExporter(Config(port=0), RunInfo(run_name="t", backend="fake", out_dir=tmp_path, max_steps=4,
                                                          emit=lambda event: None))
    assert b"rollout" not in generate_latest(exporter.registry)  # a dataset run exports none of them
    for step in range(3):
        exporter.trainctl_rollout_received(RolloutReceived(step=step, policy_version=step, staleness=0, completions=4,
                                                           tokens=10, generation_s=0.5, reused=step == 2, time=0.0))
        exporter.trainctl_weights_published(WeightsPublished(step=step + 1, version=step + 1, duration=0.0, time=0.0))
    exporter.trainctl_notice(Notice(step=3, kind=notices.STALE_BATCH_DROPPED, time=0.0))
    text = generate_latest(exporter.registry).decode()
    assert 'trainctl_rollout_completions_total{backend="fake",rank="0",run="t"} 8.0' in text  # the reused one not again
    assert 'trainctl_rollout_tokens_total{backend="fake",rank="0",run="t"} 20.0' in text
    assert 'trainctl_policy_version{backend="fake",rank="0",run="t"} 3.0' in text
    assert 'trainctl_stale_batches_dropped_total{backend="fake",rank="0",run="t"} 1.0' in text


def test_a_pause_holds_the_producer_and_releases_it(registry, tmp_path):
    """Pause acts on the producer too: ``hold(True)`` when the pause starts, ``hold(False)`` when it ends."""
    run, result = rollout_run(registry, tmp_path, 'plugins=["script", "recorder"]', "plugin.script.pause_at=[2]",
                              "plugin.script.pause_polls=2")
    assert result.status == "completed", result.reason
    assert run.backend.producer.held == [True, False]
