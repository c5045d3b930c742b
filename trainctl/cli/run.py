"""``trainctl run``: validate everything, print the plan, train."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from trainctl.cli.options import backend_option, config_argument, set_option

#: Ask before starting only when a person is there to answer and the run is long.
CONFIRM_OVER_S = 600.0


def register(cli: click.Group) -> None:
    cli.add_command(run)


LAUNCHERS = """\b
Several processes: the launcher starts trainctl once per rank (these forms work from any directory):
  torchrun --standalone --nproc_per_node=N -m trainctl run CONFIG
  accelerate launch --multi_gpu --num_processes N -m trainctl run CONFIG
  accelerate launch --multi_gpu --num_processes N --no_python trainctl run CONFIG
"""


@click.command(epilog=LAUNCHERS)
@config_argument
@backend_option
@click.option("--out", "out_dir", metavar="DIR", help="Run directory (overrides train.out_dir).")
@set_option
@click.option("--resume", default="auto", show_default=True, metavar="auto|never|PATH",
              help="Resume from the newest complete checkpoint in the run directory, never, or PATH.")
@click.option("--force", is_flag=True, help="Resume even if locked config keys changed.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Validate config, data and model, print the plan, exit.")
def run(config: str | None, backend: str | None, out_dir: str | None, overrides: tuple[str, ...],
        resume: str, force: bool, yes: bool, dry_run: bool) -> int:
    """Train a model (without CONFIG: a char-level GPT on the embedded tiny-shakespeare)."""
    from trainctl.control import requeue
    from trainctl.kernel import config as cfg
    from trainctl.kernel.registry import Registry

    registry = Registry.discover()
    resolved = cfg.load(config, registry, overrides=list(overrides), backend=backend, out_dir=out_dir)
    if dry_run:
        return _dry_run(resolved, registry, resume=resume, force=force)

    from trainctl.kernel.run import Run  # imports torch: after the config is known to be valid

    session = Run(resolved, registry, resume=resume, force=force)
    _warn(resolved.warnings, emit=session.info.emit, step=session.state.step)
    if session.state.step >= session.config.train.max_steps:  # the backend may have derived it (epochs)
        session.close()
        click.echo(
            f"{session.out_dir} already finished {session.state.step} steps (train.max_steps = "
            f"{session.config.train.max_steps}); raise train.max_steps to continue, or --resume never to start over"
        )
        return 0
    estimate = print_plan(session)
    if estimate > CONFIRM_OVER_S and not yes and _interactive():
        click.confirm(f"this run takes about {_duration(estimate)}; start?", default=True, abort=True)
    result = session.fit()
    if result.status == "failed":
        click.echo(f"trainctl: run failed at step {result.step}: {result.reason}", err=True)
        return 1
    if result.reason == "interrupted":
        return 130
    return requeue.EXIT_REQUEUE if requeue.requeued(result.reason) else 0


def _dry_run(resolved, registry, *, resume: str, force: bool) -> int:
    """Set the run up as for training, print the plan, train nothing and leave nothing behind:
    setting up creates the out dir (and the controller's lock), so what did not exist before is
    removed again."""
    from trainctl.kernel.run import Run

    created = _first_missing(Path(resolved.train.out_dir))
    try:
        session = Run(resolved, registry, resume=resume, force=force)
        _warn(resolved.warnings)
        print_plan(session)
        session.close()
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
    click.echo("dry run: config, data and model are valid; nothing was trained")
    return 0


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None: it all exists)."""
    path = path.absolute()
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _warn(warnings: tuple[str, ...], *, emit=None, step: int = 0) -> None:
    """Each warning as a stderr line and, for a run, a ``config_warning`` notice (delivered after
    run_start, so events.jsonl keeps it); from the main process only."""
    import time

    from trainctl.cli import is_main_process

    if not is_main_process():
        return
    for line in warnings:
        click.echo(f"trainctl: warning: {line}", err=True)
        if emit is not None:
            from trainctl.hooks import notices
            from trainctl.hooks.events import Notice

            emit(Notice(step=step, kind=notices.CONFIG_WARNING, message=line, time=time.time()))


def print_plan(session) -> float:
    """Print what is about to happen; returns the estimated seconds to finish."""
    plan, train = session.plan, session.config.train
    steps_left = max(train.max_steps - session.state.step, 0)
    per_step = session.backend.measure(2) if steps_left else 0.0
    estimate = per_step * steps_left
    if session.info.is_main:
        start = f"resume at step {session.state.step} from {session.resumed_from}" if session.resumed_from else "fresh start"
        lines = [
            f"plan: {plan.summary}",
            f"  parameters {plan.params:,} trainable of {plan.total_params:,} | device {plan.device} {plan.dtype}",
            f"  {plan.tokens_per_step:,} tokens/step x {steps_left} steps ({start})",
            f"  estimated {per_step * 1000:.1f} ms/step -> about {_duration(estimate)} of training | out {session.out_dir}",
        ]
        if plan.memory is not None:
            lines.append(f"  memory: {plan.memory.line()}")
        lines += [f"  {k}: {v}" for k, v in plan.details.items()]
        lines.append(f"  cadence: {session.cadence_line()}")
        if "lr" in session.config.plugin:  # the schedule a TRL user compares (warmup: 100 here, 0 there)
            from trainctl.plugins.lr import describe

            lines.append(f"  lr schedule: {describe(session.config.plugin['lr'], train.max_steps)}")
        click.echo("\n".join(lines))
    return estimate


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty() and not os.environ.get("CI")


def _duration(seconds: float) -> str:
    from trainctl.plugins.console import human_duration

    return human_duration(seconds)
