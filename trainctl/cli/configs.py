"""``trainctl config show``: the fully resolved config, defaults included."""

from __future__ import annotations

import click

from trainctl.cli.options import backend_option, config_argument, set_option


def register(cli: click.Group) -> None:
    cli.add_command(config)


@click.group()
def config() -> None:
    """Inspect and convert configs."""


@config.command("show")
@config_argument
@backend_option
@set_option
def show(config: str | None, backend: str | None, overrides: tuple[str, ...]) -> None:
    """Print CONFIG fully resolved (every default filled in) as TOML."""
    from trainctl.kernel import config as cfg
    from trainctl.kernel.registry import Registry

    resolved = cfg.load(config, Registry.discover(), overrides=list(overrides), backend=backend)
    click.echo(cfg.dump_toml(resolved.to_dict()), nl=False)
