"""``trainctl run``: validate everything, print the plan, train."""

from __future__ import annotations

import os
import sys

import click

from trainctl.cli.options import backend_option, config_argument, set_option

#: Ask before starting only when a person is there to answer and the run is long.
CONFIRM_OVER_S = 600.0


def register(cli: click.Group) -> None:
    cli.add_command(run)


@click.command()
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
    from trainctl.kernel import config as cfg
    from trainctl.kernel.registry import Registry

    registry = Registry.discover()
    resolved = cfg.load(config, registry, overrides=list(overrides), backend=backend, out_dir=out_dir)

    from trainctl.kernel.run import Run  # imports torch: after the config is known to be valid

    session = Run(resolved, registry, resume=resume, force=force)
    if session.state.step >= session.config.train.max_steps:  # the backend may have derived it (epochs)
        session.close()
        click.echo(
            f"{session.out_dir} already finished {session.state.step} steps (train.max_steps = "
            f"{session.config.train.max_steps}); raise train.max_steps to continue, or --resume never to start over"
        )
        return 0
    estimate = print_plan(session)
    if dry_run:
        session.close()
        click.echo("dry run: config, data and model are valid; nothing was trained")
        return 0
    if estimate > CONFIRM_OVER_S and not yes and _interactive():
        click.confirm(f"this run takes about {_duration(estimate)}; start?", default=True, abort=True)
    result = session.fit()
    if result.status == "failed":
        click.echo(f"trainctl: run failed at step {result.step}: {result.reason}", err=True)
        return 1
    return 130 if result.reason == "interrupted" else 0


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
        lines += [f"  {k}: {v}" for k, v in plan.details.items()]
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
