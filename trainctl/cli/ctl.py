"""``trainctl ctl RUN_DIR stop|pause|resume|save|eval``: steer a live run from outside."""

from __future__ import annotations

import time
from pathlib import Path

import click

from trainctl.kernel.errors import ConfigError

POLL_S = 0.05


def register(cli: click.Group) -> None:
    cli.add_command(ctl)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, readable=False, path_type=Path))  # checked below, in one line
@click.argument("command", type=click.Choice(["stop", "pause", "resume", "save", "eval"]))
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds to wait for the run's answer.")
def ctl(run_dir: Path, command: str, timeout: float) -> None:
    """Send COMMAND to the run live in RUN_DIR and print its answer.

    \b
    stop    save a checkpoint and end the run (status "stopped")
    pause   hold after the current step; the process and model stay in memory
    resume  continue a paused run
    save    write a checkpoint now (waits until it is written)
    eval    evaluate now (waits for the losses)
    """
    try:
        _send(run_dir, command, timeout)
    except OSError as exc:  # e.g. another user's run directory
        where = f" ({exc.filename})" if exc.filename else ""
        raise ConfigError(
            f"cannot use the control channel of {run_dir}: {exc.strerror or exc}{where}; "
            "run trainctl ctl as the user who started the run"
        ) from None


def _send(run_dir: Path, command: str, timeout: float) -> None:
    from trainctl.control import channel
    from trainctl.control.files import read_json

    control = channel.control_dir(run_dir)
    if control.is_symlink():  # a run never makes one: commands and answers would go elsewhere
        raise ConfigError(f"{control} is a symlink, not the control directory a run makes; refusing to use it")
    holder = channel.live(run_dir)
    if holder is None:
        raise ConfigError(f"no live run in {run_dir}: {_why_not_live(run_dir)}")
    if "controller" not in holder.get("plugins", ["controller"]):
        raise ConfigError(f"the run in {run_dir} (pid {holder.get('pid', '?')}) does not take commands: "
                          "add \"controller\" to its plugins list")
    ident = channel.send(run_dir, command)
    ack_file = channel.ack_path(channel.control_dir(run_dir), ident)
    deadline = time.monotonic() + timeout
    answer = None
    while time.monotonic() < deadline:
        answer = read_json(ack_file)
        # save and eval answer twice: accepted at once, done when the work is finished
        if answer is not None and (command not in ("save", "eval") or answer.get("status") != "accepted"):
            break
        if answer is None and channel.live(run_dir) is None:
            channel.withdraw(run_dir, ident)
            raise ConfigError(f"the run in {run_dir} ended before it read the command")
        time.sleep(POLL_S)
    if answer is None:
        channel.withdraw(run_dir, ident)
        raise ConfigError(
            f"no answer from the run in {run_dir} (pid {holder.get('pid', '?')}) within {timeout:g} s; "
            "it may be inside a long step, evaluation or save: try again with a longer --timeout"
        )
    ack_file.unlink(missing_ok=True)
    status = answer.get("status")
    if status == "rejected":
        raise ConfigError(answer.get("message", "the run rejected the command"))
    suffix = " (still in progress when --timeout ran out)" if status == "accepted" and command in ("save", "eval") else ""
    click.echo(f"{command}: {answer.get('message', status)} [step {answer.get('step')}, pid {holder.get('pid', '?')}]{suffix}")


def _why_not_live(run_dir: Path) -> str:
    from trainctl.control.files import read_json

    if not run_dir.is_dir():
        return "no such directory"
    status = read_json(run_dir / "status.json")
    if status is not None:
        return f"its last run is {status.get('state')} (pid {status.get('pid')} is not running it); start one with trainctl run --out {run_dir}"
    return "no run has started there"
