"""TRL used as a library: ``SFTTrainer`` prepares the rows (chat template, assistant/completion
masks, truncation, BFD or wrapped packing), supplies its collator and patches the model with its
fused LM head (the loss). Its training loop is never run: the kernel's loop drives the steps.

Which rows make a step is a pure function of (seed, step, micro-batch): a seeded permutation per
epoch, so a resumed run, or any number of ranks, sees exactly the same batches with no data
position to save. ``data.order`` picks the permutation: ``trainctl``'s NumPy one of (seed, epoch),
or ``trl``, transformers' ``Trainer``'s (so TRL's): ``Accelerator.prepare`` swaps the
``RandomSampler`` it asks for for accelerate's ``SeedableRandomSampler``, reseeded with
``seed + epoch`` at every epoch. That sampler itself draws the permutation here, over the prepared
rows, as ``Trainer`` draws it over ``trainer.train_dataset``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainctl.backends.hf import row_ids
from trainctl.kernel.errors import ConfigError

COLUMNS = ("input_ids", "labels", "seq_lengths")  # what TRL's collator reads (Trainer drops the rest)


@dataclass(frozen=True, kw_only=True, slots=True)
class Batch:
    """A collated micro-batch on the host, and its counts (free: read from CPU tensors)."""

    inputs: dict[str, Any]
    trained: int  # labels that score a next token (shifted, as the loss counts them)
    tokens: int  # positions the model processes, padding included


@contextlib.contextmanager
def quiet() -> Any:
    """Progress bars and info logs of datasets/transformers/TRL off: the console plugin speaks."""
    import datasets
    import transformers

    bars = datasets.is_progress_bar_enabled()
    tf_bars = transformers.logging.is_progress_bar_enabled()
    level = transformers.logging.get_verbosity()
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    previous = logging.getLogger("trl").level
    logging.getLogger("trl").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # deprecation notices meant for the libraries' own callers
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()
        if tf_bars:
            transformers.logging.enable_progress_bar()
        transformers.logging.set_verbosity(level)
        logging.getLogger("trl").setLevel(previous)


class SFTData:
    """The prepared train/val rows, TRL's collator, and the model TRL patched (or wrapped in
    peft). ``mask`` is ``none``, ``assistant_only`` or ``completion_only``."""

    def __init__(self, *, model: Any, tokenizer: Any, train_rows: list[dict] | Any, val_rows: list[dict] | None,
                 mask: str, packing: str | bool, text_field: str, eos_token: str, max_length: int,
                 batch_size: int, seed: int, use_cpu: bool, peft_config: Any = None, order: str = "trainctl",
                 order_seed: int = -1, identify: bool = False) -> None:
        """``identify``: number the training rows (``row_ids.py``) and keep the ids as :attr:`row_ids`."""
        from datasets import Dataset, IterableDataset
        from trl import SFTConfig

        streaming = isinstance(train_rows, IterableDataset)  # stream.py reads it; Trainer wants a max_steps then

        self.workdir = tempfile.TemporaryDirectory(prefix="trainctl-hf-")  # Trainer wants an output_dir
        args = SFTConfig(
            output_dir=self.workdir.name, report_to=[], use_cpu=use_cpu, seed=seed,
            bf16=False, fp16=False, activation_checkpointing=False,  # the backend does both itself
            per_device_train_batch_size=batch_size, max_length=max_length,
            packing=bool(packing), packing_strategy=packing or "bfd",
            assistant_only_loss=mask == "assistant_only", completion_only_loss=mask == "completion_only",
            dataset_text_field=text_field, eos_token=eos_token or None, shuffle_dataset=False,
            save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True, log_level="error",
            **({"max_steps": 1} if streaming else {}),
        )
        train_ds = train_rows if streaming else Dataset.from_list(train_rows)
        try:
            with quiet():
                self.trainer = row_ids.trainer_class()(
                    model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
                    train_dataset=row_ids.number(train_ds) if identify and not streaming else train_ds,
                    eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
                )
        except (ValueError, RuntimeError) as exc:  # TRL's own checks of the data and template
            raise ConfigError(f"TRL cannot prepare the data: {str(exc).splitlines()[0]}") from None
        self.model = self.trainer.model  # a PeftModel when LoRA is on
        self.collate = self.trainer.data_collator
        self.padding_free = self.trainer.padding_free
        self.train = None if streaming else self._columns(self.trainer.train_dataset, "train")
        self.row_ids = row_ids.RowIds.read(self.trainer.train_dataset) if identify and not streaming else None
        eval_ds = self.trainer.eval_dataset
        self.val = self._columns(eval_ds, "val") if eval_ds is not None else None
        self.seed = seed
        self.shuffler, self.order_seed = shuffler(order, order_seed, seed)
        self._orders: dict[tuple[str, int], np.ndarray] = {}

    def prepare(self, raw: Any) -> Any:
        """``raw`` training rows (a stream's) prepared as TRL prepared the trainer's own."""
        trainer = self.trainer
        with quiet():
            return trainer._prepare_dataset(raw, trainer.processing_class, trainer.args, trainer.args.packing, None, "train")

    def hold(self, rows: list[dict[str, Any]]) -> None:
        """Prepared ``rows`` as the training rows evaluation samples from (a stream's first ones)."""
        from datasets import Dataset

        self.train = Dataset.from_list(rows)

    @staticmethod
    def _columns(ds: Any, split: str) -> Any:
        if len(ds) == 0:
            raise ConfigError(f"no {split} rows are left after TRL's preparation (all truncated to nothing or fully masked)")
        return ds.select_columns([c for c in COLUMNS if c in ds.column_names])

    # --- which rows, in which order --------------------------------------------------------

    def order(self, split: str, epoch: int, shuffle: bool) -> np.ndarray:
        """The row order of one pass over ``split``: the file's without ``shuffle`` (how evaluation
        reads the validation rows, as ``Trainer``'s sequential sampler does); else trainctl's
        permutation of (seed, epoch), or for training rows under ``data.order = "trl"``
        ``Trainer``'s of (order seed, epoch), which also draws evaluation's fixed training sample."""
        key = (split, epoch)
        if key not in self._orders:
            n = len(self.train if split == "train" else self.val)
            if len(self._orders) > 4:
                self._orders.clear()
            if not shuffle:
                self._orders[key] = np.arange(n)
            elif split == "train" and self.shuffler == "trl":
                self._orders[key] = trainer_order(n, self.order_seed, epoch)
            else:
                self._orders[key] = trainctl_order(n, self.seed, epoch, split)
        return self._orders[key]

    def indices(self, split: str, first: int, count: int, shuffle: bool) -> list[int]:
        """Rows number ``first .. first + count - 1`` of the endless, epoch-by-epoch stream."""
        n = len(self.train if split == "train" else self.val)
        out = []
        for i in range(first, first + count):
            epoch, pos = divmod(i, n)
            out.append(int(self.order(split, epoch, shuffle)[pos]))
        return out

    def rows(self, split: str, indices: list[int]) -> list[dict[str, Any]]:
        columns = (self.train if split == "train" else self.val)[indices]  # one Arrow read per batch
        names = list(columns)
        return [dict(zip(names, values)) for values in zip(*columns.values())]

    def batch(self, rows: list[dict[str, Any]]) -> Batch:
        inputs = self.collate(rows)
        labels = inputs["labels"]
        return Batch(inputs=inputs, trained=int((labels[..., 1:] != -100).sum()), tokens=labels.numel())


def shuffler(order: str, order_seed: int, seed: int) -> tuple[str, int]:
    """``data.order`` and the seed it draws with (``order_seed`` -1: the run's, as ``Trainer``
    falls back from ``data_seed`` to ``seed``)."""
    if order not in ("trainctl", "trl"):
        raise ConfigError(f'data.order must be "trainctl" or "trl", got {order!r}')
    return order, seed if order_seed == -1 else order_seed


def trainctl_order(n: int, seed: int, epoch: int, split: str) -> np.ndarray:
    """trainctl's permutation of ``n`` rows: a NumPy generator of (seed, epoch, split). Checkpoints
    of ``data.order = "trainctl"`` runs resume on it: it must never change."""
    return np.random.default_rng((seed, epoch, 0 if split == "train" else 1)).permutation(n)


def trainer_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """``Trainer``'s permutation of ``n`` rows in ``epoch``: accelerate's ``SeedableRandomSampler``
    (``torch.randperm`` with a generator seeded ``seed + epoch``), built as ``prepare`` builds it
    (no generator: it makes one on torch's default device, as in ``Trainer``) and iterated once."""
    from accelerate.data_loader import SeedableRandomSampler

    sampler = SeedableRandomSampler(range(n), data_seed=seed)
    sampler.set_epoch(epoch)
    return np.fromiter(sampler, dtype=np.int64, count=n)


def mask_check(rows: list[dict[str, Any]], mask: str) -> tuple[float, str]:
    """Fraction of tokens trained on in ``rows`` (prepared, before collation), and the problem
    with it if masking was asked for and it trains on everything or nothing."""
    total = sum(len(r["labels"]) for r in rows)
    trained = sum(sum(1 for t in r["labels"] if t != -100) for r in rows)
    fraction = trained / total if total else 0.0
    if mask == "none":
        return fraction, ""
    if trained == 0:
        return fraction, f"data.mask = {mask} trains on no token of the first batch; check the chat template's {{% generation %}} markers or the data"
    if trained == total:
        return fraction, f"data.mask = {mask} trains on every token of the first batch (nothing is masked); the template or the columns do not mark the prompt"
    return fraction, ""


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in inputs.items()}
