"""A mixture that cannot be trained, through the real CLI: one line naming the problem and the
fix, exit 2, no traceback, and the run it was pointed at (checkpoint, events, sample record)
left exactly as it was."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import TINY_GPT, run_cli
from tests.live import sets
from tests.mixture_data import mixture_sets

FAST = [*TINY_GPT, "train.threads=1", "train.eval_steps=1", "data.record_samples=true"]


def snapshot(out) -> dict[str, str]:
    """Every file a failed start must not touch, by content."""
    kept = [p for p in out.rglob("*") if p.is_file() and p.name not in ("status.json", "lock")]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in kept}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mixture_sources):
    out = tmp_path_factory.mktemp("errors") / "run"
    run_cli("run", "--yes", "--out", str(out), *sets(*FAST, "train.max_steps=3",
            *mixture_sets(mixture_sources, {"plays": 1, "more": 1})), check=True)
    return out


@pytest.mark.parametrize("mix, expected", [
    ({"plays": 0, "more": 0}, "the weights of data.sources sum to 0; give at least one source a positive weight"),
    ({"plays": 1, "more": -0.5}, "data.sources[1].weight must be at least 0, got -0.5"),
    ({"plays": 1, "missing": 1}, "data.sources[1] ('nowhere'): {missing} does not exist; prepare it: trainctl prepare TEXT_FILE --out {missing}"),
    ({"plays": 1, "empty": 1}, "data.sources[1] ('empty'): no prepared data in {empty} (meta.json missing); run: trainctl prepare TEXT_FILE --out {empty}"),
    ({"plays": 1, "chars": 1}, "data.sources[1] ('chars') has the char tokenizer (vocabulary "),
], ids=["weights_sum_to_0", "negative_weight", "missing_source", "not_prepared", "other_vocabulary"])
def test_a_bad_mixture_is_one_line_exit_2_and_loses_nothing(trained, mixture_sources, tmp_path, mix, expected):
    paths = dict(mixture_sources, missing=tmp_path / "nowhere", empty=tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    before = snapshot(trained)
    proc = run_cli("run", "--yes", "--out", str(trained), *sets(*FAST, "train.max_steps=6", *mixture_sets(paths, mix)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected.format(**paths) in lines[0], lines[0]
    if "chars" in mix:
        assert "a mixture's sources must share one vocabulary: prepare every one with the same --tokenizer" in lines[0]
    assert snapshot(trained) == before


def test_data_path_and_sources_together_name_both(mixture_sources, tmp_path):
    proc = run_cli("run", "--yes", "--out", str(tmp_path / "o"), *sets(
        *FAST, f"data.path='{mixture_sources['plays']}'", *mixture_sets(mixture_sources, {"more": 1})))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "data.path" in proc.stderr and "and data.sources are both set; keep one" in proc.stderr


def test_other_weights_on_resume_are_refused_as_a_locked_key(trained, mixture_sources):
    """The mixture decides the order of every sample: resuming with other weights would train
    other samples from the checkpoint on, so it takes --force, like another data.path."""
    before = snapshot(trained)
    proc = run_cli("run", "--yes", "--out", str(trained), *sets(*FAST, "train.max_steps=6",
                   *mixture_sets(mixture_sources, {"plays": 1, "more": 2})))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "locked keys differ (data.sources: [{'path': " in proc.stderr and "'weight': 2.0" in proc.stderr
    assert "restore them, start over with --resume never, or pass --force" in proc.stderr
    assert snapshot(trained) == before
