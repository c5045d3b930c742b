"""``trainctl export CHECKPOINT -o DIR``: one consolidated checkpoint from any checkpoint, a
sharded one (FSDP, any number of ranks) included.

DIR is the checkpoint a one-process run writes: ``gpt``: ``model.safetensors`` + ``optimizer.pt``
(``trainctl sample``/``eval``, ``--resume DIR``); ``hf``: a ``save_pretrained`` directory
(``AutoModelForCausalLM.from_pretrained(DIR)``; with LoRA the adapter, as an hf checkpoint
always holds it: ``PeftModel.from_pretrained``), its tokenizer, ``optimizer.pt``. The kernel's
files and every rank's RNG come along, and DIR gets its own manifest, so it verifies and
resumes like the original. The checkpoint is read in this one process (DCP reads the shards
into full tensors) through the same path as ``trainctl eval``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from trainctl.kernel.errors import ConfigError


def register(cli: click.Group) -> None:
    cli.add_command(export)


@click.command()
@click.argument("target", metavar="RUN_DIR|CHECKPOINT", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="The new directory to write (must not exist).")
@click.option("--device", default="cpu", show_default=True, help="Where to load the model while exporting.")
def export(target: Path, out: Path, device: str) -> None:
    """Write one consolidated checkpoint (safetensors / save_pretrained) from a checkpoint
    (RUN_DIR: its newest verified one), sharded or not."""
    from trainctl.evaluation import find_checkpoint

    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out} already exists; export into a new directory")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent} is not a directory; create it first or export elsewhere")
    checkpoint = find_checkpoint(target)
    step, backend = consolidate(checkpoint, out, device)
    click.echo(f"exported {checkpoint} (step {step}, {backend}) to {out}")


def consolidate(checkpoint: Path, out: Path, device: str) -> tuple[int, str]:
    """Write the verified ``checkpoint`` as the new checkpoint ``out``, in the full layout;
    (step, backend)."""
    from trainctl.evaluation import Evaluator
    from trainctl.kernel.checkpoint_files import SHARD_SUFFIX, SHARDED_METADATA, seal

    tmp = out.parent / f".tmp-export-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="trainctl-export-") as scratch:
        evaluator = Evaluator(work_dir=Path(scratch), device=device, load_only=True)  # no data check: nothing trains
        try:
            with evaluator.loaded(checkpoint) as (manifest, config, backend, copy):
                tmp.mkdir()
                backend.save(tmp)  # one process: the full layout
                # the run's own kernel files, RNG of every rank, model shape, tokenizer: as they were
                for name in manifest["files"]:
                    if name != SHARDED_METADATA and not name.endswith(SHARD_SUFFIX):
                        shutil.copyfile(copy / name, tmp / name)
                seal(tmp, out, manifest["step"], "export")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            evaluator.close()
    return manifest["step"], config.backend
