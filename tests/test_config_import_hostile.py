"""``trainctl config import-trl`` / ``import-nanogpt`` on hostile files, through the real CLI:
too big, nested too deep, a YAML alias bomb or cycle, a FIFO, values that overflow. Each must be
one line on stderr and exit 2, quickly, never a traceback or an internal error (issue 13's
audit: a 300 MB YAML ran past 60 s; ``[[[[...]]]]`` 100000 deep was a RecursionError)."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import run_cli

DEEP = 100_000
BIG = 2 << 20  # 2 MiB


def refused(proc, *words: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("trainctl: error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def timed(*args: str, timeout: float = 60) -> tuple[object, float]:
    started = time.monotonic()
    proc = run_cli(*args, timeout=timeout)
    return proc, time.monotonic() - started


@pytest.mark.parametrize("command, text", [
    ("import-trl", "learning_rate: 2.0e-5\nlr_scheduler_kwargs: [" + "1, " * (BIG // 3) + "1]\n"),
    ("import-nanogpt", "learning_rate = 6e-4\nbatch_size = [" + "1, " * (BIG // 3) + "1]\n"),
], ids=["trl", "nanogpt"])
def test_a_file_past_the_cap_is_refused_before_it_is_parsed(tmp_path, command, text):
    """2 MiB of valid config: before, pure-Python YAML spent ~18 s on it and converted it (exit 0)."""
    source = tmp_path / "big"
    source.write_text(text)
    assert source.stat().st_size > BIG
    proc, seconds = timed("config", command, str(source))
    refused(proc, "larger than 256 KiB")
    assert seconds < 5


@pytest.mark.parametrize("command, text", [
    ("import-trl", "lr_scheduler_kwargs: " + "[" * DEEP + "]" * DEEP + "\n"),  # RecursionError in the composer
    ("import-trl", "lr_scheduler_kwargs: " + "[" * 200 + "]" * 200 + "\n"),  # parses: the depth cap (32)
    ("import-nanogpt", "n_layer = " + "-" * DEEP + "1\n"),  # MemoryError in the parser
    ("import-nanogpt", "n_layer = " + "+".join(["1"] * DEEP) + "\n"),  # RecursionError building the AST
    ("import-nanogpt", "n_layer = " + "not " * DEEP + "1\n"),
    ("import-nanogpt", "n_layer = " + "(" * 150 + "1" + ",)" * 150 + "\n"),  # a literal: the depth cap
], ids=["yaml-100000", "yaml-200", "unary", "sum", "not", "tuples"])
def test_deep_nesting_is_one_line(tmp_path, command, text):
    """Before: RecursionError or MemoryError as an internal error (exit 1) from either parser.
    What the parsers survive (200 levels of YAML, 150 of tuples) was converted into TOML no run
    could use; past 32 levels it is refused, so nothing after the parser recurses that deep."""
    source = tmp_path / "deep"
    source.write_text(text)
    proc, seconds = timed("config", command, str(source))
    refused(proc, "deep")
    assert seconds < 10


ALIAS_BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcdefgh", "bcdefghi")
) + "optim: *i\n"  # 9**9 items: repr() in the note about optim expanded them all


@pytest.mark.parametrize("text", [ALIAS_BOMB, "lr_scheduler_kwargs: &a [*a]\n"], ids=["bomb", "cycle"])
def test_yaml_aliases_are_not_expanded(tmp_path, text):
    source = tmp_path / "aliases.yaml"
    source.write_text(text)
    proc, seconds = timed("config", "import-trl", str(source), timeout=30)
    refused(proc)
    assert seconds < 10


@pytest.mark.parametrize("text, words", [
    ("warmup_steps: .inf\n", "warmup_steps: expected a number"),  # int(inf): OverflowError
    ("max_steps: .nan\n", "max_steps: expected a number"),  # before: nan > 0 is false, so silently ignored
    ("max_steps: " + "9" * 5000 + "\n", "not a readable trl config"),  # int() of 5000 digits: ValueError
], ids=["inf", "nan", "long-int"])
def test_values_that_overflow_are_one_line(tmp_path, text, words):
    source = tmp_path / "values.yaml"
    source.write_text(text)
    refused(run_cli("config", "import-trl", str(source)), words)


@pytest.mark.parametrize("command", ["import-trl", "import-nanogpt"])
def test_a_fifo_is_refused_without_blocking(tmp_path, command):
    """Before, read_text() waited for a writer forever (click's exists=True lets a FIFO through)."""
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    refused(run_cli("config", command, str(fifo), timeout=20), "not a regular file")


def test_an_unhashable_nanogpt_literal_is_a_note(tmp_path):
    """``{[1]: 2}`` is a literal that literal_eval cannot build (TypeError, before an internal error)."""
    source = tmp_path / "train_x.py"
    source.write_text("batch_size = 4\nweird = {[1]: 2}\n")
    proc = run_cli("config", "import-nanogpt", str(source))
    assert proc.returncode == 0, proc.stderr
    assert "line 2: skipped weird: its value is not a literal (weird = {[1]: 2})" in proc.stderr
    assert "batch_size = 4" in proc.stdout


def test_a_save_steps_ratio_is_a_note(tmp_path):
    """TRL's ``save_steps: 0.5`` (a ratio) with no save_strategy: before, KeyError 'save_strategy'
    as an internal error."""
    source = tmp_path / "ratio.yaml"
    source.write_text("save_steps: 0.5\n")
    proc = run_cli("config", "import-trl", str(source))
    assert proc.returncode == 0, proc.stderr
    assert "save_steps: 0.5 not converted (a ratio; set train.save_interval)" in proc.stderr
