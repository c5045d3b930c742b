"""``trainctl eval``: evaluate a checkpoint locally, exactly as the eval worker does remotely."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click


def register(cli: click.Group) -> None:
    cli.add_command(evaluate)


@click.command(name="eval")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--device", help="Evaluate on this device instead of the run's train.device.")
@click.option("--prompt", "prompts", multiple=True, help="Also generate from this fixed prompt (repeatable).")
@click.option("--max-new-tokens", default=100, show_default=True, type=click.IntRange(1, 1024))
def evaluate(target: Path, as_json: bool, device: str | None, prompts: tuple[str, ...], max_new_tokens: int) -> None:
    """Val loss, perplexity and train loss of a checkpoint (RUN_DIR: its newest verified one),
    on the run's fixed evaluation batches."""
    from trainctl.evaluation import Evaluator, SampleRequest, find_checkpoint

    checkpoint = find_checkpoint(target)
    samples = SampleRequest(prompts=prompts, max_new_tokens=max_new_tokens) if prompts else None
    with tempfile.TemporaryDirectory(prefix="trainctl-eval-") as scratch:
        evaluator = Evaluator(work_dir=Path(scratch), device=device)
        try:
            result = evaluator.evaluate(checkpoint, samples=samples)
        finally:
            evaluator.close()
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(f"checkpoint {result.checkpoint} (step {result.step}, {result.backend}, {result.device})")
    parts = [
        f"val loss {result.val_loss:.4f}" if result.val_loss is not None else "",
        f"loss mean {result.loss_mean} (train.eval_loss)" if result.loss_mean != "tokens" else "",
        f"perplexity {result.perplexity:.3f}" if result.perplexity is not None else "",
        f"accuracy {result.accuracy:.4f}" if result.accuracy is not None else "",
        f"train loss {result.train_loss:.4f}" if result.train_loss is not None else "",
        f"{result.duration:.1f}s",
    ]
    click.echo("  " + " | ".join(p for p in parts if p))
    for sample in result.samples:
        click.echo(f"--- {sample['prompt']!r}\n{sample['prompt']}{sample['text']}")
