"""Options shared by the commands that read a config."""

from __future__ import annotations

import click

config_argument = click.argument("config", required=False, type=click.Path(dir_okay=False))
backend_option = click.option("--backend", help="Backend to use (overrides the config's backend).")
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config value, parsed as TOML: --set train.max_steps=100 (repeatable).",
)
