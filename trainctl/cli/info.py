"""``trainctl plugins`` and ``trainctl backends``: what is available, and from where."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    cli.add_command(plugins)
    cli.add_command(backends)


@click.command()
def plugins() -> None:
    """List available plugins (enable them with plugins = [...] in a config)."""
    from trainctl.kernel.config import DEFAULT_PLUGINS, DEFAULTS
    from trainctl.kernel.registry import Registry

    registry = Registry.discover()
    width = max(len(name) for name in registry.plugins)
    for name, spec in sorted(registry.plugins.items()):
        tags = [spec.source] + (["default"] if name in DEFAULT_PLUGINS else []) + (["critical"] if spec.critical else [])
        click.echo(f"{name:<{width}}  {spec.description}  [{', '.join(tags)}]")
    for name, why in registry.broken.items():
        click.echo(f"{name:<{width}}  (failed to load: {why})")
    click.echo(f'\nplugins = ["{DEFAULTS}", "prometheus"] adds to the default list ({", ".join(DEFAULT_PLUGINS)}); '
               "list order is call order, loggers last")


@click.command()
def backends() -> None:
    """List available backends (choose one with --backend or backend = "...")."""
    from trainctl.kernel.registry import Registry

    registry = Registry.discover()
    width = max(len(name) for name in registry.backends)
    for name, spec in sorted(registry.backends.items()):
        click.echo(f"{name:<{width}}  {spec.description}  [{spec.source}]")
