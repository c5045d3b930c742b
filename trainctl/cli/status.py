"""``trainctl status RUN_DIR``: what a run is doing, or how it ended."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from trainctl.kernel.errors import ConfigError

LIVE_STATES = ("starting", "running", "paused", "evaluating", "saving", "waiting")


def register(cli: click.Group) -> None:
    cli.add_command(status)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, readable=False, path_type=Path))  # checked below
@click.option("--json", "as_json", is_flag=True, help="Print status.json (plus \"alive\") as JSON.")
def status(run_dir: Path, as_json: bool) -> None:
    """Show the state of the run in RUN_DIR (from its status.json)."""
    from trainctl.control.files import read_json

    try:
        os.stat(run_dir / "status.json")
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. another user's private run directory
        raise ConfigError(f"cannot read the run status in {run_dir}: {exc.strerror}; "
                          "run trainctl status as the user who started the run") from None
    doc = read_json(run_dir / "status.json")
    if doc is None:
        why = "no such directory" if not run_dir.is_dir() else "no status.json (is the status plugin enabled?)"
        raise ConfigError(f"no run status in {run_dir}: {why}")
    doc["alive"] = alive(run_dir, doc)
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    click.echo(describe(doc))


def alive(run_dir: Path, doc: dict) -> bool | None:
    """True/False when it can be known: the control lock, else the pid on this host."""
    from trainctl.control import channel
    from trainctl.control.files import hostname, pid_alive

    try:
        if (channel.control_dir(run_dir) / channel.LOCK).exists():
            holder = channel.live(run_dir)
            return holder is not None and holder.get("pid") == doc.get("pid")
    except PermissionError:  # control/ is private to the run's user: fall back on the pid
        pass
    if doc.get("host") == hostname() and isinstance(doc.get("pid"), int):
        return pid_alive(doc["pid"])
    return None


def restart_lines(doc: dict) -> list[str]:
    restarts, recovery = doc.get("restarts"), doc.get("recovery")
    if not isinstance(restarts, int) or restarts <= 0:
        return []
    line = f"restarts   {restarts}"
    if isinstance(recovery, dict) and isinstance(recovery.get("total_s"), (int, float)):
        line += f", last recovery {recovery['total_s']:.1f} s from the last step before the fault to the first after it"
    return [line]


def rollout_lines(doc: dict) -> list[str]:
    rollout = doc.get("rollout")
    if not isinstance(rollout, dict) or not isinstance(rollout.get("policy_version"), int):
        return []
    dropped = rollout.get("dropped") if isinstance(rollout.get("dropped"), int) else 0
    idle = [f"{who} idle {rollout[key]:.0%}" for who, key in (("trainer", "trainer_idle_fraction"),
                                                              ("generator", "generator_idle_fraction"))
            if isinstance(rollout.get(key), (int, float))]
    if isinstance(rollout.get("workers_up"), int):
        idle.append(f"{rollout['workers_up']} rollout worker{'s' if rollout['workers_up'] != 1 else ''} up")
    if isinstance(rollout.get("waiting"), str):
        idle.append(f"waiting: {rollout['waiting']}")
    return [f"rollout    policy version {rollout['policy_version']}, staleness {rollout.get('staleness')}, "
            f"{dropped} stale batch{'es' if dropped != 1 else ''} dropped" + "".join(f", {part}" for part in idle)]


def describe(doc: dict) -> str:
    from trainctl.plugins.console import human_duration

    now = time.time()
    state, pid = doc.get("state"), doc.get("pid")
    if state in LIVE_STATES and doc.get("alive") is False:
        state_line = (f"{state}, but its process (pid {pid} on {doc.get('host')}) is gone: it crashed or was "
                      f"killed; run again with the same --out to resume from the last checkpoint")
    elif state in LIVE_STATES:
        state_line = f"{state} (pid {pid} on {doc.get('host')})"
    else:
        state_line = state + (f": {doc['reason']}" if doc.get("reason") else "")
    step, max_steps = doc.get("step") or 0, doc.get("max_steps") or 0
    progress = f"{step} / {max_steps}" + (f" ({step / max_steps:.0%})" if max_steps else "")
    if state in LIVE_STATES and doc.get("alive") is not False and doc.get("eta_s") is not None:
        progress += f", eta {human_duration(doc['eta_s'])}"
    lines = [f"run        {doc.get('run_name')} ({doc.get('backend')}) in {doc.get('out_dir')}",
             f"state      {state_line}",
             f"step       {progress}"]
    losses = [f"train {doc['loss']:.4f}" if isinstance(doc.get("loss"), (int, float)) else None,
              f"val {doc['val_loss']:.4f}" if isinstance(doc.get("val_loss"), (int, float)) else None]
    if any(losses):
        lines.append(f"loss       {', '.join(x for x in losses if x)}")
    if doc.get("tokens_per_s"):
        lines.append(f"speed      {doc['tokens_per_s']:,.0f} tokens/s")
    ckpt = doc.get("last_checkpoint")
    if ckpt:
        lines.append(f"checkpoint {ckpt.get('path')} (step {ckpt.get('step')}, {ckpt.get('reason')})")
    if doc.get("error"):
        lines.append(f"error      {doc['error']}")
    if doc.get("metrics_address"):
        lines.append(f"metrics    {doc['metrics_address']}")
    lines += restart_lines(doc) + rollout_lines(doc)
    if doc.get("started"):
        ago = human_duration(now - doc["updated"]) if doc.get("updated") else "never"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["started"]))
        lines.append(f"started    {started}, updated {ago} ago")
    return "\n".join(lines)
