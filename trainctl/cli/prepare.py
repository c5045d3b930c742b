"""``trainctl prepare``: a text file into ``train.bin``/``val.bin``/``meta.json`` for the gpt backend."""

from __future__ import annotations

from pathlib import Path

import click


def register(cli: click.Group) -> None:
    cli.add_command(prepare)


@click.command()
@click.argument("text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@click.option("--tokenizer", type=click.Choice(["char", "byte", "gpt2"]), default="char", show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.5, min_open=True), default=0.1, show_default=True)
def prepare(text_file: Path, out_dir: Path, tokenizer: str, val_fraction: float) -> None:
    """Tokenize TEXT_FILE (the last fraction becomes the validation split)."""
    from trainctl.backends.gpt.data import prepare as run_prepare

    meta = run_prepare(text_file, out_dir, tokenizer, val_fraction)
    click.echo(
        f"wrote {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
        f"{meta['tokenizer']} vocabulary of {meta['vocab_size']:,} ({meta['dtype']})"
    )
