"""The config model through the real CLI: "defaults" in the plugins list, the start-up warnings
(no SIGTERM handling or status; a table for a plugin that is left out), another backend's key,
and a dry run that leaves nothing behind."""

from __future__ import annotations

import json
import tomllib

from tests.conftest import ROOT, TINY_GPT, run_cli
from tests.live import sets
from trainctl.kernel.config import DEFAULT_PLUGINS

SHAKESPEARE_CHAR = str(ROOT / "configs" / "shakespeare_char.toml")


def test_defaults_expand_in_place_and_config_show_prints_the_list():
    proc = run_cli("config", "show", "--set", 'plugins=["loss_guard", "defaults", "prometheus"]', check=True)
    assert tomllib.loads(proc.stdout)["plugins"] == ["loss_guard", *DEFAULT_PLUGINS, "prometheus"]
    twice = run_cli("config", "show", "--set", 'plugins=["defaults", "checkpoint"]')
    assert twice.returncode == 2 and twice.stderr.strip().splitlines() == [
        "trainctl: error: plugins lists 'checkpoint' twice (\"defaults\" holds "
        "lr, controller, checkpoint, status, console, jsonl); each name may appear once"
    ]


def test_config_show_prints_secrets_empty_and_says_which():
    proc = run_cli("config", "show", *sets('plugins=["defaults", "notify", "remote_eval"]',
                                            "plugin.notify.url='https://hooks.example/T0KEN-abc'",
                                            "plugin.remote_eval.token='s3cret-value'"), check=True)
    assert "T0KEN-abc" not in proc.stdout + proc.stderr and "s3cret-value" not in proc.stdout + proc.stderr
    assert "# secrets shown empty: plugin.notify.url, plugin.remote_eval.token" in proc.stdout
    shown = tomllib.loads(proc.stdout)["plugin"]
    assert shown["notify"]["url"] == "" and shown["remote_eval"]["token"] == ""


def test_a_list_without_safety_warns_an_unused_table_is_ignored_and_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    proc = run_cli("run", SHAKESPEARE_CHAR, "--dry-run", "--out", str(out),
                   *sets(*TINY_GPT, "train.threads=1", 'plugins=["lr", "console"]'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "trainctl: warning: plugins leaves out controller and status: without controller, SIGTERM and "
        "Ctrl-C end the run without a checkpoint and trainctl ctl cannot reach it; without status, "
        "trainctl status has nothing to show; add them, or start the list with \"defaults\"",
        "trainctl: warning: [plugin.checkpoint] is ignored: 'checkpoint' is not in plugins = [...]",
    ]
    assert "dry run" in proc.stdout
    assert not (tmp_path / "new").exists()  # not even the parent of the out dir


def test_a_dry_run_in_an_existing_directory_keeps_it(tmp_path):
    (tmp_path / "mine.txt").write_text("kept")
    proc = run_cli("run", "--dry-run", "--out", str(tmp_path), *sets(*TINY_GPT, "train.threads=1"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "kept"


def test_another_backends_key_names_that_backend(tmp_path):
    proc = run_cli("run", "--dry-run", "--out", str(tmp_path / "o"), "--set", "model.name_or_path=Qwen/Qwen3-0.6B")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "trainctl: error: unknown key 'model.name_or_path' for the 'gpt' backend: it is a key of the 'hf' "
        "backend; use --backend hf or backend = \"hf\""
    ]
    typo = run_cli("config", "show", "--set", "model.n_layers=2")
    assert typo.returncode == 2 and "did you mean 'n_layer'" in typo.stderr  # a typo stays a typo
    section = run_cli("config", "show", "--set", "hf.lora.r=4")
    assert section.returncode == 2 and "use --backend hf" in section.stderr


def test_the_safety_warning_is_also_a_notice_in_the_events(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("run", "--yes", "--out", str(out),
                   *sets(*TINY_GPT, "train.threads=1", "train.max_steps=2", "plugin.lr.warmup_steps=1",
                         'plugins=["lr", "jsonl"]'), check=True)
    assert proc.stderr.startswith("trainctl: warning: plugins leaves out controller and status"), proc.stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    notices = [e for e in events if e["event"] == "notice" and e["kind"] == "config_warning"]
    assert [e["event"] for e in events][0] == "run_start"
    assert len(notices) == 1 and notices[0]["message"].startswith("plugins leaves out controller and status")
