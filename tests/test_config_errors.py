"""Every bad input: one line on stderr naming the problem and the fix, exit code 2, no traceback,
before any training starts."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from trainctl.cli import main


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainctl: error: "), captured.err
    assert "Traceback" not in captured.err and "step" not in captured.out.lower()
    return lines[0]


def dry(tmp_path, *more: str) -> list[str]:
    return ["run", "--dry-run", "--yes", "--out", str(tmp_path / "out"), *more]


def test_unknown_key_suggests_the_right_one(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--set", "train.max_stpes=5"))
    assert "unknown key 'train.max_stpes'" in line and "did you mean 'max_steps'" in line


def test_unknown_key_in_a_file(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nn_layers = 2\n")
    line = fails(capsys, *dry(tmp_path, str(cfg)))
    assert "model.n_layers" in line and "n_layer" in line


def test_wrong_type(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--set", "train.max_steps='many'"))
    assert "train.max_steps must be an integer" in line and "'many'" in line


def test_out_of_range(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--set", "train.batch_size=0"))
    assert "train.batch_size must be at least 1, got 0" in line


def test_bad_choice(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--set", "optim.name='lion'"))
    assert "optim.name must be one of 'adamw', 'muon', 'sgd', 'adafactor', 'adamw_8bit'" in line


def test_toml_syntax_error_names_the_line(capsys, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("seed = 1\n[train]\nmax_steps = = 3\n")
    line = fails(capsys, *dry(tmp_path, str(cfg)))
    assert "TOML syntax error" in line and "line 3" in line


def test_missing_config_file(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, str(tmp_path / "nope.toml")))
    assert "config file not found" in line


def test_unknown_plugin_lists_the_available_ones(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--set", 'plugins=["lr", "consol"]'))
    assert "unknown plugin 'consol'" in line and "console" in line and "jsonl" in line


def test_table_for_an_unknown_plugin(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--set", "plugin.jsonn.path='x'"))
    assert "[plugin.jsonn] configures no known plugin (did you mean 'jsonl'?)" in line


def test_unknown_backend_lists_the_available_ones(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--backend", "jax"))
    assert "unknown backend 'jax'" in line and "gpt" in line


def test_missing_data(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--set", f"data.path='{tmp_path / 'nowhere'}'"))
    assert "no prepared data" in line and "trainctl prepare" in line


def test_empty_data(capsys, tmp_path):
    data = tmp_path / "data"
    (tmp_path / "t.txt").write_text("hello world, " * 200)
    main_ok = ["prepare", str(tmp_path / "t.txt"), "--out", str(data)]
    with pytest.raises(SystemExit) as ok:
        main(main_ok)
    assert ok.value.code == 0
    (data / "val.bin").write_bytes(b"")
    capsys.readouterr()
    line = fails(capsys, *dry(tmp_path, "--set", f"data.path='{data}'"))
    assert "val.bin is missing or empty" in line


def test_empty_text_file_for_prepare(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    line = fails(capsys, "prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d"))
    assert "is empty" in line


def test_block_size_larger_than_the_data(capsys, tmp_path):
    data = tmp_path / "data"
    (tmp_path / "t.txt").write_text("abcdefgh" * 100)  # 80 val tokens
    with pytest.raises(SystemExit):
        main(["prepare", str(tmp_path / "t.txt"), "--out", str(data)])
    capsys.readouterr()
    line = fails(capsys, *dry(tmp_path, "--set", f"data.path='{data}'", "--set", "model.block_size=128"))
    assert "block_size 128 is larger than the val data" in line


def test_vocabulary_mismatch(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--set", "model.vocab_size=10"))
    assert "model.vocab_size 10 is smaller than the data's vocabulary (65)" in line


def test_unwritable_out_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--dry-run", "--out", str(blocker / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not writable" in err and "--out" in err


def test_bad_override_syntax(capsys, tmp_path):
    line = fails(capsys, *dry(tmp_path, "--set", "train.max_steps"))
    assert "expected KEY=VALUE" in line


def test_real_process_exit_code_and_single_line(tmp_path):
    proc = run_cli("run", "--yes", "--out", str(tmp_path / "o"), "--set", "train.max_stpes=3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "trainctl: error: unknown key 'train.max_stpes' (did you mean 'max_steps'?)"
    ]
    assert proc.stdout == ""
