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
