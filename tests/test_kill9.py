"""kill -9 at random moments of a run that saves every step (bench/kill9.py, 20 trials here):
no partial checkpoint ever appears under a real name, every restart resumes from the newest
complete one, and the survivor ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, cli_env


def test_kill_9_twenty_times(tmp_path):
    report_file = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kill9.py"), "--trials", "20",
         "--out", str(tmp_path / "runs"), "--json", str(report_file), "--seed", "3"],
        env=cli_env(), capture_output=True, text=True, timeout=240,
    )
    assert report_file.exists(), proc.stdout + proc.stderr
    report = json.loads(report_file.read_text())
    assert report["problems"] == [], report["problems"]
    assert proc.returncode == 0
    assert report["kills"] == 20
    assert report["final_identical_to_uninterrupted"] is True
    assert report["resumes_from_checkpoint"] >= 15  # all but kills that came before the first save
    assert report["killed_mid_write"] >= 1  # some kills did land inside a checkpoint write
    for trial in report["detail"]:
        assert trial["corrupt"] == []
        assert trial["status_state"] in (None, "starting", "running", "saving")  # None: killed before it began
