"""``trainctl sample``: text from the newest complete checkpoint of a run, either backend (the
checkpoint's files say which: an hf checkpoint is a ``save_pretrained`` directory)."""

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
@click.option("--greedy", is_flag=True,
              help="The most likely token each time (no sampling: --temperature, --top-k and --seed are unused).")
@click.option("--no-chat-template", "plain", is_flag=True,
              help="hf: continue --prompt as plain text even if the tokenizer has a chat template "
                   "(a model trained on plain text).")
def sample(run_dir: Path, prompt: str, num_samples: int, max_new_tokens: int, temperature: float,
           top_k: int, seed: int, device: str, greedy: bool, plain: bool) -> None:
    """Generate text from RUN_DIR's newest complete checkpoint (or from a checkpoint directory).

    gpt checkpoints continue --prompt as it is; hf checkpoints put it through the tokenizer's
    chat template as a user message when the tokenizer has one (unless --no-chat-template).
    """
    import tempfile

    from trainctl.kernel.checkpoint_files import named_as

    with tempfile.TemporaryDirectory(prefix="trainctl-sample-") as scratch:
        copy = Path(scratch) / "checkpoint"
        original = _verified_copy(run_dir, copy)  # what is loaded is what was verified
        with named_as(copy, original):
            if _backend_of(copy) == "hf":
                texts, chat = _hf(copy, prompt, num_samples, max_new_tokens=max_new_tokens,
                                  temperature=0.0 if greedy else temperature,  # 0: do_sample=False
                                  top_k=top_k or None, seed=seed, device=device, chat_template=not plain)
            else:  # sampling from the single most likely token is argmax: greedy
                texts, chat = _gpt(copy, prompt, num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=1 if greedy else top_k or None, seed=seed, device=device), False
    for i, text in enumerate(texts):
        click.echo(text if chat else prompt + text)  # a chat reply answers the prompt; text continues it
        if i < num_samples - 1:
            click.echo("---------------")


def _verified_copy(run_dir: Path, dest: Path) -> Path:
    """RUN_DIR (a checkpoint) or its newest complete checkpoint, copied into ``dest`` from the
    very bytes that were verified (as ``eval`` and the eval worker load them)."""
    import os

    from trainctl.kernel.checkpoint_files import MANIFEST, NotVerified, checkpoints, open_checkpoint, snapshot

    candidates = [run_dir] if (run_dir / MANIFEST).exists() else list(reversed(checkpoints(run_dir / "checkpoints")))
    for candidate in candidates:
        try:
            fd = open_checkpoint(candidate)
            try:
                snapshot(fd, dest)
            finally:
                os.close(fd)
            return candidate
        except NotVerified:
            continue
    raise ConfigError(f"no complete checkpoint in {run_dir}; train first (trainctl run --out {run_dir})")


def _backend_of(directory: Path) -> str:
    """The backend that wrote the checkpoint: ``kernel.json`` says; a bare ``save_pretrained``
    directory (``config.json``, or a LoRA ``adapter_config.json``) is hf."""
    import json

    try:
        backend = json.loads((directory / "kernel.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    if isinstance(backend, str) and backend in ("gpt", "hf"):
        return backend
    return "hf" if (directory / "config.json").is_file() or (directory / "adapter_config.json").is_file() else "gpt"


def _gpt(directory: Path, prompt: str, n: int, *, seed: int, device: str, **kw) -> list[str]:
    from trainctl.backends.gpt.inference import load_for_inference, sample as generate

    model, tokenizer = load_for_inference(directory, device)
    return [generate(model, tokenizer, prompt, seed=seed + i, device=device, **kw) for i in range(n)]


def _hf(directory: Path, prompt: str, n: int, *, seed: int, device: str, chat_template: bool,
        **kw) -> tuple[list[str], bool]:
    try:
        from trainctl.backends.hf import sample as hf_sample
    except ImportError as exc:
        raise ConfigError(f"{directory} is an hf checkpoint; sampling it needs a missing package ({exc.name}): "
                          "pip install 'trainctl[hf]'") from None
    if (directory / ".metadata").is_file():  # sharded (FSDP): consolidated first, as trainctl export does
        import tempfile

        from trainctl.cli.export import consolidate

        with tempfile.TemporaryDirectory(prefix="trainctl-sample-") as scratch:
            consolidate(directory, Path(scratch) / "checkpoint", device)
            return _hf(Path(scratch) / "checkpoint", prompt, n, seed=seed, device=device, chat_template=chat_template, **kw)
    loaded = hf_sample.load(directory, device, chat_template=chat_template)
    return [hf_sample.sample(loaded, prompt, seed=seed + i, **kw) for i in range(n)], loaded.shape == "messages"
