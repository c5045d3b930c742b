"""``trainctl sample``: text from the newest complete checkpoint of a gpt run."""

from __future__ import annotations

from pathlib import Path

import click

from trainctl.kernel.errors import ConfigError


def register(cli: click.Group) -> None:
    cli.add_command(sample)


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", default="\n", show_default=True)
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(1))
@click.option("--max-new-tokens", default=300, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(0.0, min_open=True))
@click.option("--top-k", default=200, show_default=True, type=click.IntRange(0), help="0 = no top-k.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def sample(run_dir: Path, prompt: str, num_samples: int, max_new_tokens: int, temperature: float,
           top_k: int, seed: int, device: str) -> None:
    """Generate text from RUN_DIR's newest complete checkpoint (or from a checkpoint directory)."""
    from trainctl.backends.gpt.inference import load_for_inference, sample as generate
    from trainctl.kernel.checkpoint_files import MANIFEST, checkpoints, verify

    candidates = [run_dir] if (run_dir / MANIFEST).exists() else list(reversed(checkpoints(run_dir / "checkpoints")))
    chosen = next((c for c in candidates if verify(c) is None), None)
    if chosen is None:
        raise ConfigError(f"no complete checkpoint in {run_dir}; train first (trainctl run --out {run_dir})")
    model, tokenizer = load_for_inference(chosen, device)
    for i in range(num_samples):
        text = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k or None, seed=seed + i, device=device)
        click.echo(prompt + text)
        if i < num_samples - 1:
            click.echo("---------------")
