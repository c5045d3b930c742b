"""``trainctl config show``: the fully resolved config, defaults included; ``trainctl config
import-nanogpt`` / ``import-trl``: a nanoGPT config file or a ``trl sft --config`` YAML as TOML."""

from __future__ import annotations

from pathlib import Path

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
    from trainctl.kernel.secrets import redacted, secret_keys

    resolved = cfg.load(config, Registry.discover(), overrides=list(overrides), backend=backend)
    for line in resolved.warnings:
        click.echo(f"trainctl: warning: {line}", err=True)
    click.echo(f'# plugins: call order; in a config "{cfg.DEFAULTS}" stands for {", ".join(cfg.DEFAULT_PLUGINS)}')
    hidden = [f"plugin.{name}.{key}" for name, c in resolved.plugin.items() for key in secret_keys(c) if getattr(c, key)]
    if hidden:  # as in the config.toml saved with every checkpoint: a terminal or a log is no place for them
        click.echo(f"# secrets shown empty: {', '.join(hidden)}")
    click.echo(cfg.dump_toml(redacted(resolved.to_dict(), resolved.plugin)), nl=False)


@config.command("import-nanogpt")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the TOML here instead of stdout.")
def import_nanogpt(source: Path, output: Path | None) -> None:
    """Convert a nanoGPT config file (plain `key = value` lines, at most 256 KiB; parsed, never
    executed) to TOML.

    Settings the file does not give take nanoGPT's train.py defaults. What could not be
    converted is listed on stderr.
    """
    from trainctl.backends.gpt.nanogpt_config import import_file

    conversion = import_file(source)
    _write_converted(source, "nanoGPT config", "import-nanogpt", conversion.tables, conversion.notes, output)


@config.command("import-trl")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the TOML here instead of stdout.")
@click.option("--trainer", type=click.Choice(["auto", "sft", "dpo", "grpo"]), default="auto", show_default=True,
              help="The TRL script the file is for; auto: grpo when it sets a key only GRPOConfig has "
                   "(num_generations, reward_funcs, ...), else dpo when one only DPOConfig has (beta, ...).")
def import_trl(source: Path, output: Path | None, trainer: str) -> None:
    """Convert a `trl sft --config`, `trl dpo --config` or `trl grpo --config` YAML file (at most 256 KiB, read with
    yaml.safe_load, never executed) to TOML for the hf backend.

    Settings the file does not give take TRL's defaults, so the run trains what `trl sft` would:
    the same tokens, rows in the same order, epochs, learning rate at every step, loss and eval
    loss. What could not be converted is listed on stderr.
    """
    from trainctl.backends.hf.trl_config import import_file

    tables, notes = import_file(source, trainer)
    _write_converted(source, "trl config", "import-trl", tables, notes, output)


def _write_converted(source: Path, what: str, command: str, tables: dict, notes: list[str], output: Path | None) -> None:
    """A converted config as TOML on stdout or into ``output``; what was not converted on stderr."""
    from trainctl.kernel import config as cfg

    text = f"# converted from {what} {source} by trainctl config {command}\n" + cfg.dump_toml(tables)
    for note in notes:
        click.echo(f"trainctl: {source}: {note}", err=True)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
