"""The ``trainctl`` command line. Importing this must stay light (no torch): every command
imports what it needs inside its body, so ``trainctl --help`` answers at once."""

from __future__ import annotations

import os
import sys
import time

import click

from trainctl.kernel.errors import ConfigError

RANK_GRACE_S = 5.0  # how long a rank other than 0 waits for the launcher to end it


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="trainctl")
def cli() -> None:
    """trainctl: an event-driven training kernel for language models.

    \b
    trainctl run                         train the default model on the embedded data
    trainctl run CONFIG --set K=V ...    train from a TOML config, with overrides
    trainctl plugins | backends          what can be enabled
    trainctl status RUN_DIR              what a run is doing (or how it ended)
    trainctl ctl RUN_DIR stop|pause|resume|save|eval    steer a live run
    trainctl rollout-worker CONFIG --port P --weights DIR   generate GRPO batches for a trainer
    """


def build_cli() -> click.Group:
    from trainctl.cli import (configs, ctl, eval_worker, evaluate, export, info, plot, prepare, rollout_worker, run, sample,
                              status)
    from trainctl.kernel.registry import Registry

    for module in (run, configs, info, prepare, sample, ctl, status, evaluate, export, eval_worker, rollout_worker, plot):
        module.register(cli)
    registry = Registry.discover()
    registry.register_commands(cli)  # third-party commands, through the hook
    return cli


def is_main_process() -> bool:
    """Rank 0 under torchrun/accelerate launch (LOCAL_RANK 0 where only that is set), or alone."""
    if not _launched():
        return True
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    return rank.strip() == "0"


def _launched() -> bool:
    """Started by a launcher as one of several processes."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def one_line(text: str) -> str:
    """An error message as one printable line (a value in it may hold a newline or a NUL)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in " ".join(text.splitlines()))


def _from_this_rank(message: str) -> str:
    """The error as the main process prints it; another rank first waits to be ended by the
    launcher. torchrun and accelerate launch end every rank (SIGTERM) within 0.1 s of one's exit,
    so when rank 0 met the same error (the usual case: the same config on every rank), it is
    printed once. A rank still here after the grace period met an error of its own (a path only
    its node lacks) and says it, with its rank."""
    if is_main_process():
        return message
    time.sleep(RANK_GRACE_S)
    return f"rank {os.environ.get('RANK') or os.environ.get('LOCAL_RANK')}: {message}"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line and exit code 2 for usage/config errors, never a traceback.
    Under a launcher every rank meets the same bad config: only the main process says so."""
    try:
        group = build_cli()
        code = group.main(args=argv, prog_name="trainctl", standalone_mode=False)
    except ConfigError as exc:
        click.echo(f"trainctl: error: {_from_this_rank(one_line(str(exc)))}", err=True)
        code = 2
    except click.exceptions.Abort:
        click.echo("trainctl: aborted", err=True)
        code = 130
    except click.ClickException as exc:  # a usage error: the same on every rank, as above
        if not is_main_process():
            time.sleep(RANK_GRACE_S)
        exc.show()
        code = exc.exit_code
    except Exception as exc:
        if os.environ.get("TRAINCTL_DEBUG"):
            raise
        click.echo(f"trainctl: internal error: {type(exc).__name__}: {exc} (TRAINCTL_DEBUG=1 shows the traceback)", err=True)
        code = 1
    code = code if isinstance(code, int) else 0
    if _launched():
        # Under torchrun/accelerate interpreter teardown can abort in torch's C++ destructors
        # ("terminate called without an active exception", seen 1 run in 5 on gloo), which turns
        # a completed run into a failed launch, and a config error into a core dump. A finished
        # run has closed its files; a refused one wrote nothing: flush and leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
