"""``trainctl plot``: curves read from events.jsonl (last record of a step wins), several runs
overlaid, a real PNG written headless."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import run_cli
from trainctl.cli.plot import read_curves


def write_run(directory, losses: dict[int, float], vals: dict[int, float], *, resumed_at: int | None = None) -> None:
    directory.mkdir(parents=True)
    records = [{"event": "run_start", "step": 0}]
    for step, loss in losses.items():
        records.append({"event": "step", "step": step, "loss": loss, "lr": 1e-3 * (1 - step / 400)})
        if step in vals:
            records.append({"event": "eval", "step": step, "split": "val", "loss": vals[step], "source": "local"})
            records.append({"event": "eval", "step": step, "split": "train", "loss": 0.0})
    if resumed_at is not None:  # the crashed process logged past its checkpoint; the resume logs those steps again
        records.append({"event": "run_start", "step": resumed_at})
        records += [{"event": "step", "step": s, "loss": l - 0.5, "lr": 1e-4} for s, l in losses.items() if s > resumed_at]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"event": "step", "st'  # a torn last line
    (directory / "events.jsonl").write_text(text)


def test_last_record_of_a_step_wins(tmp_path):
    write_run(tmp_path / "a", {10: 3.0, 20: 2.5, 30: 2.2}, {20: 2.6}, resumed_at=20)
    curves = read_curves(tmp_path / "a")
    assert curves.loss == {10: 3.0, 20: 2.5, 30: 2.2 - 0.5} and curves.lr[30] == 1e-4
    assert curves.val == {20: 2.6}  # train-split evaluations are not the validation curve


def test_plot_overlays_runs_into_a_png(tmp_path):
    steps = range(10, 410, 10)
    write_run(tmp_path / "baseline", {s: 4.0 * np.exp(-s / 150) + 1.5 for s in steps}, {s: 4.0 * np.exp(-s / 150) + 1.7 for s in steps[4::5]})
    write_run(tmp_path / "wide", {s: 4.0 * np.exp(-s / 90) + 1.3 for s in steps}, {s: 4.0 * np.exp(-s / 90) + 1.45 for s in steps[4::5]})
    png = tmp_path / "plots" / "cmp.png"
    proc = run_cli("plot", str(tmp_path / "baseline"), str(tmp_path / "wide"), "-o", str(png), check=True)
    assert f"wrote {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[..., :3]  # (H, W, 3) in [0, 1]
    assert pixels.shape[0] > 500 and pixels.std() > 0.05
    # both runs are drawn in their own colours (matplotlib's first two: C0 blue, C1 orange)
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        close = np.abs(pixels - np.array(rgb) / 255).max(axis=-1) < 0.05
        assert close.sum() > 500, f"colour {rgb} barely present ({close.sum()} pixels)"


def test_plot_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "has no events.jsonl" in proc.stderr and not (tmp_path / "x.png").exists()


# JSON that is no trainctl event: what a hand-edited or foreign events.jsonl may hold
NOT_EVENTS = [
    "[1, 2]", '"text"', "true", "3",
    '{"event": "step", "step": [1], "loss": 2.0, "lr": 1e-3}',
    '{"event": "step", "step": "5", "loss": 2.0, "lr": 1e-3}',
    '{"event": "step", "step": true, "loss": 2.0, "lr": 1e-3}',
    '{"event": "step", "step": {"a": 1}, "loss": 2.0, "lr": 1e-3}',
    '{"event": "step", "step": 7, "loss": "low", "lr": 1e-3}',
    '{"event": "step", "step": 8, "loss": 2.0, "lr": [1]}',
    '{"event": "step", "step": 9, "loss": 1e999, "lr": 1e-3}',
    '{"event": "eval", "step": 3.5, "split": "val", "loss": 2.0}',
    '{"event": "eval", "step": 100000000000000000000000, "split": "val", "loss": 2.0}',
    "[" * 100_000 + "]" * 100_000,  # deep enough for a RecursionError in json.loads
]


def test_lines_that_are_json_but_not_events_are_skipped_with_one_warning(tmp_path):
    """Before, nine of these lines alone were each an 'internal error' (exit 1): AttributeError
    (the four that are not objects), TypeError (a list or dict as a step: a dict key; a string:
    str < int while sorting), ValueError (a list as lr, in numpy), RecursionError (the deep one);
    the others were plotted as if they were steps (a bool step) or silently dropped."""
    write_run(tmp_path / "a", {10: 3.0, 20: 2.5, 30: 2.2}, {20: 2.6})
    events = tmp_path / "a" / "events.jsonl"
    good = events.read_text().splitlines()
    events.write_text("\n".join([good[0], *NOT_EVENTS, *good[1:]]) + "\n")
    png = tmp_path / "a.png"
    proc = run_cli("plot", str(tmp_path / "a"), "-o", str(png), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"trainctl: warning: {events}: skipped {len(NOT_EVENTS)} lines that are JSON but no trainctl event "
        "(first: line 2); plotted without them"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_curves(tmp_path / "a").loss == {10: 3.0, 20: 2.5, 30: 2.2}


def test_a_file_of_only_non_events_is_refused_in_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "events.jsonl").write_text("\n".join(NOT_EVENTS) + "\n")
    proc = run_cli("plot", str(tmp_path / "a"), "-o", str(tmp_path / "a.png"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"has no logged steps (skipped {len(NOT_EVENTS)} lines that are JSON but no trainctl event" in proc.stderr
    assert not (tmp_path / "a.png").exists()


def test_a_step_metric_is_drawn_in_its_own_panel(tmp_path):
    """``--metric reward``: a value the backend logs in each step's ``metrics`` (GRPO's reward),
    plotted against the step beside the loss; a name no step logged is refused in one line that
    lists the ones it has."""
    write_run(tmp_path / "a", {10: 0.0, 20: 0.0, 30: 0.0}, {})
    events = tmp_path / "a" / "events.jsonl"
    steps = [{"event": "step", "step": s, "loss": 0.0, "lr": 1e-3, "metrics": {"reward": r, "entropy": 6.0}}
             for s, r in ((10, 0.05), (20, 0.2), (30, 0.5))]
    steps.append({"event": "step", "step": 40, "loss": 0.0, "lr": 1e-3, "metrics": {"reward": None}})  # not a number: not drawn
    events.write_text("\n".join(json.dumps(r) for r in steps) + "\n")
    assert read_curves(tmp_path / "a", metrics=("reward",)).metrics == {"reward": {10: 0.05, 20: 0.2, 30: 0.5}}
    png = tmp_path / "reward.png"
    proc = run_cli("plot", str(tmp_path / "a"), "--metric", "reward", "-o", str(png), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run_cli("plot", str(tmp_path / "a"), "--metric", "rewrad", "-o", str(tmp_path / "x.png"), timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "no step logged metric 'rewrad'" in proc.stderr and "entropy, reward" in proc.stderr
    assert not (tmp_path / "x.png").exists()
