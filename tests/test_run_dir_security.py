"""Attacks on a run directory by another local user, performed for real (issue 13, section 2).

Tests run as root here: the attacker's files are chowned to uid 65534 (nobody), which is what
the defence checks (owner and mode); a `trainctl ctl` of another user runs in a forked child that
drops to uid 65534 before calling the real CLI entry point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_GPT, make_config, run_cli
from tests.live import LiveRun
from tests.recording_plugins import INSTANCES
from trainctl.control import channel
from trainctl.control.files import read_json
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run import Run

NOBODY = 65534
CLI_RUN = ["run", "--yes", *[a for s in [*TINY_GPT, "train.threads=1", "train.max_steps=2"] for a in ("--set", s)]]


def victim_file(tmp_path: Path, name: str) -> Path:
    victim = tmp_path / name
    victim.write_text("the victim's own data\n")
    return victim


def plant_run_dir(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A run directory another user made in advance, with symlinks to the victim's files and a
    checkpoint to be resumed."""
    out = tmp_path / "shared-run"
    (out / "control").mkdir(parents=True)
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    victims = [victim_file(tmp_path, "victim-lock"), victim_file(tmp_path, "victim-events")]
    os.symlink(victims[0], out / "control" / "lock")
    os.symlink(victims[1], out / "events.jsonl")
    for path in [out, out / "control", out / "checkpoints", out / "checkpoints" / "step-000001"]:
        os.chown(path, NOBODY, NOBODY)
    for link in [out / "control" / "lock", out / "events.jsonl"]:
        os.lchown(link, NOBODY, NOBODY)
    return out, victims


def test_a_run_directory_of_another_user_is_refused_and_nothing_of_the_victim_is_touched(tmp_path):
    out, victims = plant_run_dir(tmp_path)
    proc = run_cli(*CLI_RUN, "--out", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"trainctl: error: run directory {out} belongs to uid {NOBODY}, not you (uid 0): its owner could plant "
        "symlinks or checkpoints there; choose another --out, or chown it to yourself"
    )
    assert [v.read_text() for v in victims] == ["the victim's own data\n"] * 2
    assert not (out / "status.json").exists() and sorted(p.name for p in out.iterdir()) == ["checkpoints", "control", "events.jsonl"]


@pytest.mark.parametrize("where", ["control", "checkpoints"])
def test_a_control_or_checkpoint_folder_of_another_user_is_refused(registry, tmp_path, where):
    out = tmp_path / "out"
    (out / where).mkdir(parents=True)
    os.chown(out / where, NOBODY, NOBODY)
    what = {"control": "control directory", "checkpoints": "checkpoint directory"}[where]
    with pytest.raises(ConfigError, match=f"^{what} {out / where} belongs to uid {NOBODY}, not you"):
        Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=2"), registry)


def test_a_symlink_to_the_run_directory_made_by_another_user_is_refused(registry, tmp_path):
    mine, link = tmp_path / "mine", tmp_path / "link"
    mine.mkdir(mode=0o700)
    link.symlink_to(mine)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"^run directory {link} is a symlink made by uid {NOBODY}, not you"):
        Run(make_config(registry, link, 'plugins=["checkpoint"]', "train.max_steps=2"), registry)
    assert list(mine.iterdir()) == []
    os.lchown(link, 0, 0)  # one of the user's own: followed
    assert Run(make_config(registry, link, 'plugins=["checkpoint"]', "train.max_steps=2"), registry).fit().status == "completed"
    assert (mine / "checkpoints" / "step-000002").is_dir()


def test_a_directory_writable_by_others_is_refused(registry, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    with pytest.raises(ConfigError, match=rf"^run directory {out} is writable by group or others \(mode 777\).*chmod go-w {out}"):
        Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=2"), registry)
    out.chmod(0o775)  # group-writable is refused too
    with pytest.raises(ConfigError, match="writable by group or others"):
        Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=2"), registry)


def test_a_group_writable_checkpoint_folder_counts_only_where_the_group_can_reach_it(registry, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints").chmod(0o775)  # what the checkpoint plugin makes under umask 002
    out.chmod(0o700)
    assert Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=2"), registry).fit().status == "completed"
    out.chmod(0o750)  # now the group can reach in, and write there
    with pytest.raises(ConfigError, match=f"^checkpoint directory {out / 'checkpoints'} is writable by group or others"):
        Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=4"), registry)


def test_a_configured_checkpoint_folder_is_checked_inside_and_outside_the_run_directory(registry, tmp_path):
    """``plugin.checkpoint.dir`` is read back on resume wherever it is: another user's folder, or
    one that others who can reach it may write in, is refused like the default one."""
    out, shared = tmp_path / "out", tmp_path / "shared"
    (out / "ckpt").mkdir(parents=True)
    os.chown(out / "ckpt", NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"^checkpoint directory {out / 'ckpt'} belongs to uid {NOBODY}, not you"):
        Run(make_config(registry, out, 'plugins=["checkpoint"]', "plugin.checkpoint.dir='ckpt'", "train.max_steps=2"), registry)
    shared.mkdir()
    shared.chmod(0o775)  # outside the private run directory, the group's write bit counts
    elsewhere = ['plugins=["checkpoint"]', f"plugin.checkpoint.dir='{shared}'", "train.max_steps=2"]
    with pytest.raises(ConfigError, match=f"^checkpoint directory {shared} is writable by group or others"):
        Run(make_config(registry, tmp_path / "out2", *elsewhere), registry)
    shared.chmod(0o755)
    assert Run(make_config(registry, tmp_path / "out2", *elsewhere), registry).fit().status == "completed"
    assert (shared / "step-000002").is_dir()


def test_a_symlinked_control_folder_is_refused_by_the_run_and_by_ctl(registry, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    (out / "control").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=f"^control directory {out / 'control'} is a symlink"):
        Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=2"), registry)
    proc = run_cli("ctl", str(out), "stop")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"trainctl: error: {out / 'control'} is a symlink, not the control directory a run makes; refusing to use it")
    assert list(elsewhere.iterdir()) == []


def test_a_new_run_directory_and_its_control_folder_are_private(registry, tmp_path):
    out = tmp_path / "new" / "run"
    Run(make_config(registry, out, 'plugins=["checkpoint", "status", "jsonl"]', "train.max_steps=2"), registry).fit()
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and stat.S_IMODE((out / "control").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "control" / "lock").stat().st_mode) == 0o600
    for name in ["events.jsonl", "status.json", "checkpoints.jsonl"]:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name


def test_run_files_are_never_written_through_a_symlink(registry, tmp_path, capfd):
    """Symlinks in the user's own directory (planted while it was writable, or by mistake):
    events, status (and its temporary file) and the ledger never write through them."""
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    victims = {name: victim_file(tmp_path, f"victim-{name}") for name in ["events", "status", "tmp", "csv"]}
    (out / "events.jsonl").symlink_to(victims["events"])
    (out / "status.json").symlink_to(victims["status"])
    (out / f".status.json.{os.getpid()}.tmp").symlink_to(victims["tmp"])  # the old, predictable names
    (out / "metrics.tmp").symlink_to(victims["csv"])
    session = Run(make_config(registry, out, 'plugins=["checkpoint", "status", "jsonl", "csv"]', "train.max_steps=3"), registry)
    assert session.fit().status == "completed"
    assert all(v.read_text() == "the victim's own data\n" for v in victims.values())
    err = capfd.readouterr().err
    assert "plugin 'jsonl' failed in trainctl_run_start: " in err and "Too many levels of symbolic links" in err
    assert (out / "status.json").is_file() and not (out / "status.json").is_symlink()  # replaced, not followed
    assert json.loads((out / "status.json").read_text())["state"] == "completed"

    ledger_victim = victim_file(tmp_path, "victim-ledger")
    (out / "checkpoints.jsonl").unlink()
    (out / "checkpoints.jsonl").symlink_to(ledger_victim)
    result = Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=5"), registry).fit()
    assert result.status == "failed" and "Too many levels of symbolic links" in result.reason
    assert ledger_victim.read_text() == "the victim's own data\n"


def test_a_symlinked_lock_is_one_line_not_a_truncated_file(registry, tmp_path):
    out = tmp_path / "out"
    (out / "control").mkdir(parents=True, mode=0o700)
    out.chmod(0o700)
    victim = victim_file(tmp_path, "victim")
    (out / "control" / "lock").symlink_to(victim)
    with pytest.raises(ConfigError, match=f"^cannot open the run lock {out / 'control' / 'lock'} \\(a symlink\\)"):
        Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=2"), registry)
    assert victim.read_text() == "the victim's own data\n"


# --- the lock is the kernel's ----------------------------------------------------------------

def test_a_run_without_the_controller_is_refused_while_another_holds_the_directory(registry, tmp_path):
    out = tmp_path / "out"
    first = Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=2"), registry)
    with pytest.raises(ConfigError, match=f"^another run is live in {out} \\(.*\"pid\": {os.getpid()}"):
        Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=2"), registry)
    proc = run_cli(*CLI_RUN, "--out", str(out), "--set", 'plugins=["lr", "checkpoint"]')  # another process
    assert proc.returncode == 2 and proc.stderr.startswith(f"trainctl: error: another run is live in {out} (")
    assert len(proc.stderr.strip().splitlines()) == 1
    answer = run_cli("ctl", str(out), "stop")  # live, but nobody reads commands
    assert answer.returncode == 2 and answer.stderr.strip() == (
        f"trainctl: error: the run in {out} (pid {os.getpid()}) does not take commands: add \"controller\" to its plugins list")
    assert first.fit().status == "completed"  # and the directory is free again
    assert Run(make_config(registry, out, 'plugins=["checkpoint"]', "train.max_steps=4"), registry).fit().status == "completed"


# --- command files ---------------------------------------------------------------------------

class Threaded:
    """A fake-backend run with the controller on a thread of this process (no signals)."""

    def __init__(self, registry, out: Path) -> None:
        self.out, self.control = out, out / "control"
        self.session = Run(make_config(registry, out, 'plugins=["controller", "checkpoint", "status", "recorder"]',
                                       "train.max_steps=100000000"), registry, resume="never")
        self.results: list = []
        self.thread = threading.Thread(target=lambda: self.results.append(self.session.fit()))
        self.thread.start()

    def ask(self, command: str) -> dict:
        return self.answer(channel.send(self.out, command))

    def answer(self, ident: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = read_json(self.control / f"ack-{ident}.json")
            if answer:
                return answer
            time.sleep(0.01)
        raise AssertionError(f"no answer to {ident}")

    def paused(self) -> None:
        assert self.ask("pause")["status"] == "accepted"
        deadline = time.monotonic() + 10
        while (read_json(self.out / "status.json") or {}).get("state") != "paused":
            assert time.monotonic() < deadline, "never paused"
            time.sleep(0.01)

    def end(self, timeout: float = 20):
        self.thread.join(timeout)
        if self.thread.is_alive():  # the test failed: stop the run anyway
            channel.send(self.out, "stop")
            self.thread.join(30)
            raise AssertionError("the run did not stop")
        return self.results[0]


def write_command(control: Path, name: str, body: dict | str) -> None:
    (control / name).write_text(body if isinstance(body, str) else json.dumps(body))


def test_the_answer_goes_where_the_file_name_says_not_where_its_id_points(registry, tmp_path):
    out = tmp_path / "out"
    run = Threaded(registry, out)
    try:
        run.paused()
        (run.control / "ack-x").mkdir()  # so that "ack-x/../../../outside" resolves
        write_command(run.control, "cmd-1.json", {"id": "x/../../../outside", "command": "save"})
        answer = run.answer("1")
        assert answer["status"] == "accepted" and answer["id"] == "1"
        assert not (tmp_path / "outside.json").exists() and not list(tmp_path.glob(".outside*"))
    finally:
        channel.send(out, "stop")
        result = run.end()
    assert result.status == "stopped"


def test_one_bad_command_file_never_drops_the_others_of_its_batch(registry, tmp_path):
    out = tmp_path / "out"
    victim = victim_file(tmp_path, "victim")
    run = Threaded(registry, out)
    try:
        run.paused()
        # all written while paused: the next poll reads them in one batch, in name order
        write_command(run.control, "cmd-0.json", {"id": "y" * 300, "command": "save"})
        write_command(run.control, "cmd-1.json", "{not json")
        write_command(run.control, "cmd-2.json", {"command": "dance"})
        write_command(run.control, "cmd-3.json", "x" * 10000)
        write_command(run.control, f"cmd-{'z' * 200}.json", {"command": "save"})
        os.symlink(victim, run.control / "cmd-4.json")
        write_command(run.control, "cmd-5.json", {"command": "stop"})
        result = run.end()
    finally:
        if run.thread.is_alive():
            channel.send(out, "stop")
            run.thread.join(30)
    assert result.status == "stopped" and result.reason == "request"
    answers = {i: read_json(run.control / f"ack-{i}.json") for i in range(6)}
    assert answers[0]["status"] == "done" and answers[0]["command"] == "save"  # the long inner id is ignored
    assert answers[1]["status"] == "rejected" and "cmd-1.json: not JSON" in answers[1]["message"]
    assert answers[2]["status"] == "rejected" and answers[2]["message"].startswith("unknown command 'dance'")
    assert answers[3]["status"] == "rejected" and "larger than 4096 bytes" in answers[3]["message"]
    assert answers[4]["status"] == "rejected" and "Too many levels of symbolic links" in answers[4]["message"]
    assert answers[5]["status"] == "accepted" and answers[5]["command"] == "stop"
    assert victim.read_text() == "the victim's own data\n"
    assert not list(run.control.glob("cmd-*"))  # every file was taken, the bad ones too
    ignored = [e for e in INSTANCES["recorder"].events
               if type(e).__name__ == "Notice" and e.kind == "control" and e.message.startswith("ignored control file")]
    assert len(ignored) == 1 and "zzzz" in ignored[0].message


def test_a_fifo_among_the_commands_never_blocks_training(tmp_path):
    out = tmp_path / "run"
    run = LiveRun(out, "train.max_steps=1000000", "train.log_interval=5", "train.eval_interval=0")
    try:
        run.wait(lambda s: s["state"] == "running" and s["step"] >= 2)
        os.mkfifo(out / "control" / "cmd-fifo.json")
        answer = run_cli("ctl", str(out), "save", timeout=60)  # read after the FIFO, in the same poll
        assert answer.returncode == 0 and answer.stdout.startswith("save: saved "), answer.stdout + answer.stderr
        step = run.status()["step"]
        run.wait(lambda s: s["step"] > step + 3, timeout=20)  # still training
        run.proc.send_signal(signal.SIGTERM)
        assert run.exit_code(timeout=30) == 0, run.output()
        assert run.status()["state"] == "stopped"
        assert read_json(out / "control" / "ack-fifo.json")["status"] == "rejected"
    finally:
        run.close()


# --- trainctl ctl as another user ------------------------------------------------------------

def as_nobody(*argv: str) -> tuple[int, str]:
    """The real CLI entry point in a forked child that has dropped to uid 65534 (this Python is
    not executable by that user here, so no exec: the child runs the code already imported)."""
    from trainctl.cli import main

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read_end)
            sys.stdout = sys.stderr = os.fdopen(write_end, "w")
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as text
            print(f"child: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        output = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def test_ctl_on_a_run_directory_it_may_not_use_is_one_line(registry):
    import trainctl.cli.ctl  # noqa: F401  (imported here: the child cannot read this Python's files)
    import trainctl.control.channel  # noqa: F401

    parent = Path(tempfile.mkdtemp(prefix="trainctl-ctl-"))  # not under pytest's 0700 tmp root
    try:
        parent.chmod(0o755)
        out = parent / "run"
        holder = Run(make_config(registry, out, 'plugins=["controller", "checkpoint"]', "train.max_steps=2"), registry)
        out.chmod(0o700)  # what a run makes (before the fix: what a careful user makes)
        code, output = as_nobody("ctl", str(out), "stop")
        assert code == 2, output
        assert output.strip() == (
            f"trainctl: error: cannot use the control channel of {out}: Permission denied ({out / 'control'}); "
            "run trainctl ctl as the user who started the run")
        assert not list((out / "control").glob("cmd-*"))
        code, output = as_nobody("status", str(out))
        assert code == 2 and output.strip() == (
            f"trainctl: error: cannot read the run status in {out}: Permission denied; "
            "run trainctl status as the user who started the run")
        holder.close()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# --- a deleted run directory -----------------------------------------------------------------

def test_a_run_whose_directory_is_deleted_stops_as_failed(tmp_path):
    out = tmp_path / "run"
    run = LiveRun(out, "train.max_steps=1000000", "train.log_interval=5", "train.eval_interval=0")
    try:
        run.wait(lambda s: s["state"] == "running" and s["step"] >= 2)
        while out.exists():  # the run may be writing a file in it right now
            shutil.rmtree(out, ignore_errors=True)
        assert run.exit_code(timeout=30) == 1, run.output()
        assert "run failed at step " in run.output()
        # "replaced": a save that began before the deletion made the directory again; "lock":
        # rmtree removes control/lock before the directory itself, and a check may land between
        assert re.search(f"(the run directory {out} was (deleted or moved|replaced by another) while the run was going"
                         f"|the run's lock {out / 'control' / 'lock'} was removed)", run.output()), run.output()
    finally:
        run.close()
