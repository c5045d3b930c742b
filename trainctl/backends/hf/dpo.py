"""TRL's ``DPOTrainer`` used as a library, as ``sft.py`` uses ``SFTTrainer``: it prepares the pairs
(prompt extraction from implicit-prompt conversations, chat template, EOS, tokenisation, the pairs
whose prompt fills ``max_length`` dropped), supplies its collator (chosen rows then rejected rows,
one padded batch: one concatenated forward), patches the fused LM head, wraps the model in peft and
builds the reference: ``ref_model`` (a frozen copy) or, with LoRA, the same model with the adapter
disabled. Its training loop is never run. Which pairs make a step is ``sft.SFTData``'s pure
function of (seed, step, micro-batch).

``precomputed`` reference log-probs are TRL's ``compute_ref_log_probs`` over every pair, once,
before the first step, written to the run directory (``dpo_ref_logps.safetensors``) with a
fingerprint of the starting weights (TRL's ``hash_module``), the prepared token ids and
``max_length``. A resumed run, or a new one from the same weights and data, reads them back;
TRL's own precompute writes a ``datasets`` cache file that a new process does not look for.

Anyone who can write the run directory can write that file, and the fingerprint is no secret. So
a file with the run's fingerprint is used only when its tensors can be these pairs' log-probs:
float32, one (chosen, rejected) row per prepared pair of each split, all finite, and the first
batch of each split equal to a fresh forward (which catches rows shifted or values offset). Any
other file is one warning line naming it and the problem, then computed again and replaced, as a
file of other weights or data always was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainctl.backends.hf import sft
from trainctl.kernel.errors import ConfigError

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # what TRL's DataCollatorForPreference reads
REF_CACHE = "dpo_ref_logps.safetensors"
Forward = Callable[[str, list[int]], torch.Tensor]  # (split, row indices) -> (n, 2) reference log-probs


class BadCache(Exception):
    """A cache file with the run's fingerprint that cannot hold these pairs' reference log-probs."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PairBatch:
    """A collated micro-batch of pairs on the host (2B rows: chosen then rejected) and its counts."""

    inputs: dict[str, Any]  # input_ids, attention_mask, completion_mask (+ ref_*_logps when precomputed)
    pairs: int
    trained: int  # completion tokens scored (shifted, as the log-probs count them)
    tokens: int  # positions the model processes, padding included


def trainer_class() -> type:
    """``DPOTrainer`` without its own precompute (ours is cached in the run directory), so that
    ``precompute_ref_log_probs=True`` still keeps TRL from loading a reference copy."""
    from trl import DPOTrainer

    class LibraryDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            return dataset

    return LibraryDPOTrainer


class PreferenceData:
    """The prepared train/val pairs, TRL's collator, the model TRL patched (or wrapped in peft)
    and the reference (``reference``: copy | adapters_off | precomputed)."""

    # the seeded epoch orders and Arrow row reads are SFTData's, unchanged (they read only
    # self.train, self.val, self.seed, self.shuffler, self.order_seed and self._orders):
    # DPOTrainer samples its pairs with Trainer's RandomSampler, so data.order = "trl" is its order
    order = sft.SFTData.order
    indices = sft.SFTData.indices
    rows = sft.SFTData.rows

    def __init__(self, *, model: Any, ref_model: Any, tokenizer: Any, train_rows: list[dict], val_rows: list[dict] | None,
                 max_length: int, batch_size: int, seed: int, use_cpu: bool, peft_config: Any, reference: str,
                 beta: float, loss_type: str, label_smoothing: float, order: str = "trainctl",
                 order_seed: int = -1) -> None:
        from datasets import Dataset
        from trl import DPOConfig

        self.workdir = tempfile.TemporaryDirectory(prefix="trainctl-hf-")  # Trainer wants an output_dir
        # TRL's reference forward asks transformers a deprecated question on every call; the
        # answer is right, the warning is for TRL's maintainers
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        args = DPOConfig(
            output_dir=self.workdir.name, report_to=[], use_cpu=use_cpu, seed=seed, bf16=False, fp16=False,
            activation_checkpointing=False, per_device_train_batch_size=batch_size, max_length=max_length,
            beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
            precompute_ref_log_probs=reference == "precomputed",
            save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True, log_level="error",
        )
        try:
            with sft.quiet():
                self.trainer = trainer_class()(
                    model=model, ref_model=ref_model, args=args, processing_class=tokenizer, peft_config=peft_config,
                    train_dataset=Dataset.from_list(train_rows),
                    eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
                )
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # TRL's own checks of the data and template
            raise ConfigError(f"TRL cannot prepare the preference data: {str(exc).splitlines()[0]}") from None
        self.model = self.trainer.model  # a PeftModel when LoRA is on
        self.ref_model = self.trainer.ref_model  # None: adapters off, or precomputed
        self.collate = self.trainer.data_collator
        self.train = self._columns(self.trainer.train_dataset, "train", max_length)
        self.val = self._columns(self.trainer.eval_dataset, "val", max_length) if self.trainer.eval_dataset is not None else None
        self.seed = seed
        self.shuffler, self.order_seed = sft.shuffler(order, order_seed, seed)
        self._orders: dict[tuple[str, int], np.ndarray] = {}
        self.ref_logps: dict[str, torch.Tensor] = {}  # split -> (N, 2) chosen, rejected; precomputed only

    @staticmethod
    def _columns(ds: Any, split: str, max_length: int) -> Any:
        if len(ds) == 0:  # hf.dpo.too_long = "drop" left every pair out ("error" stops at the first one)
            raise ConfigError(f"no {split} pairs are left: every prompt alone fills model.max_length {max_length}, so "
                              'hf.dpo.too_long = "drop" left them all out; raise model.max_length or shorten the prompts')
        return ds.select_columns(list(COLUMNS))

    def batch(self, split: str, indices: list[int]) -> PairBatch:
        inputs = self.collate(self.rows(split, indices))
        if self.ref_logps:  # the cached reference, by prepared-row index, as TRL's collator passes it
            ref = self.ref_logps[split][indices]
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:, 0].clone(), ref[:, 1].clone()
        mask = inputs["completion_mask"]
        return PairBatch(inputs=inputs, pairs=len(indices), trained=int(mask[:, 1:].sum()), tokens=mask.numel())

    # --- the reference -------------------------------------------------------------------------

    def reference_logps(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) chosen and rejected reference log-probs: cached, or TRL's ``compute_ref_log_probs``
        on the copy or on the model with its adapter disabled (no gradient)."""
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self.trainer.compute_ref_log_probs(self.ref_model or self.model, inputs)

    def precompute(self, out_dir: Path, *, device: torch.device, autocast: Any, batch_size: int, rank: int = 0,
                   world: int = 1, lockstep: bool = False, source: str = "the starting weights") -> str:
        """Fill ``ref_logps`` from the run directory's cache, or compute and (rank 0) cache them.
        Returns the plan's line. Call before any step: the model must hold the starting weights.

        With ``world`` ranks each computes every world-th batch (the batches are TRL's, so each
        row's value is what one process computes) and the ranks exchange them. ``lockstep``
        (a sharded model: every forward is a collective) has every rank run the same number of
        forwards, a rank short of batches repeating its first one and dropping the result."""
        path = out_dir / REF_CACHE
        fingerprint = self._fingerprint()
        splits = {"train": self.train, **({"val": self.val} if self.val is not None else {})}

        def forward(split: str, indices: list[int]) -> torch.Tensor:  # (n, 2) chosen, rejected
            batch = self.collate(self.rows(split, indices))
            with autocast:
                chosen, rejected = self.reference_logps(sft.to_device(batch, device))
            return torch.stack([chosen, rejected], dim=1).float().cpu()

        with self._frozen():
            try:
                cached = _read_cache(path, fingerprint, {split: len(ds) for split, ds in splits.items()})
                if cached is not None:
                    _check_first_batch(cached, forward, batch_size)
                    self.ref_logps = cached
                    return f"precomputed, read from {path} (not recomputed)"
            except BadCache as bad:
                if rank == 0:  # every rank read the same file to the same verdict: one line
                    print(f"trainctl: warning: {path}: {bad}; not used: computed again from {source}, "
                          "and the file replaced", file=sys.stderr)
            for split, ds in splits.items():
                batches = [list(range(first, min(first + batch_size, len(ds)))) for first in range(0, len(ds), batch_size)]
                mine = list(range(rank, len(batches), world))
                rounds = -(-len(batches) // world) if lockstep else len(mine)
                parts: dict[int, torch.Tensor] = {}
                for turn in range(rounds):
                    values = forward(split, batches[mine[turn] if turn < len(mine) else 0])
                    if turn < len(mine):
                        parts[mine[turn]] = values
                if world > 1:
                    parts = _exchange(parts, world)
                self.ref_logps[split] = torch.cat([parts[i] for i in range(len(batches))])
        if rank == 0:
            _write_cache(path, self.ref_logps, fingerprint)
        return f"precomputed from {source}" + (f" on {world} ranks" if world > 1 else "") + f", cached in {path}"

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """The reference's forwards: eval mode, no gradient, the model's mode restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _fingerprint(self) -> str:
        """The starting weights (TRL's own hash), the prepared token ids and the truncation length."""
        digest = hashlib.sha256(f"{self.trainer._precompute_model_hash}|{self.trainer.args.max_length}".encode())
        for ds in (self.train, self.val):
            if ds is None:
                continue
            table = ds.with_format("arrow")[:]
            for name in COLUMNS:
                column = table[name].combine_chunks()
                digest.update(np.asarray(column.offsets).tobytes())
                digest.update(np.asarray(column.flatten()).tobytes())
        return digest.hexdigest()


def _exchange(parts: dict[int, torch.Tensor], world: int) -> dict[int, torch.Tensor]:
    """Every rank's batches of reference log-probs, on every rank (torch's ``all_gather_object``)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, parts)
    return {index: tensor for rank_parts in gathered for index, tensor in rank_parts.items()}


def _read_cache(path: Path, fingerprint: str, rows: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """Each split's (N, 2) log-probs from ``path``, ``rows`` giving N per split; None when there is
    no file or it is of other weights or data (then computed again and replaced, silently: that
    is what a cache is for). Raises ``BadCache`` for a file with this fingerprint that cannot be
    these pairs' log-probs; dtype and shape are read from the header, before any value is loaded."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            if set(f.keys()) != set(rows):
                raise BadCache(f"it covers {sorted(f.keys())}, this run's splits are {sorted(rows)}")
            for split, n in rows.items():
                _check_header(split, f.get_slice(split), n)
            tensors = {split: f.get_tensor(split) for split in rows}
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # truncated, or not safetensors
        raise BadCache(f"not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    for split, values in tensors.items():
        if not bool(torch.isfinite(values).all()):  # one NaN reference skips every step it reaches
            raise BadCache(f"{split}: {int((~torch.isfinite(values)).sum())} value(s) not finite (NaN or inf)")
    return tensors


def _check_header(split: str, view: Any, n: int) -> None:
    dtype, shape = view.get_dtype(), tuple(view.get_shape())
    if dtype != "F32":  # what _write_cache writes; any other dtype is not the values it wrote
        raise BadCache(f"{split}: dtype {dtype}, not F32 (float32)")
    if len(shape) == 2 and shape[1] == 2 and shape[0] != n:  # a batch would index past the end, or misalign
        raise BadCache(f"{split}: {shape[0]} rows for its {n} pairs")
    if shape != (n, 2):
        raise BadCache(f"{split}: shape {shape}, not ({n}, 2) (chosen, rejected for each pair)")


def _check_first_batch(cached: dict[str, torch.Tensor], forward: Forward, batch_size: int) -> None:
    """The first batch of each split against a fresh forward (one per split, every rank alike, so
    sharded ranks stay in lockstep): rows shifted or values offset look right in every other way.
    A file doctored past its first batch passes; finding that would mean computing it all again.
    The tolerance admits a file written on another device or batch size (padding changes the
    kernels' rounding); a false alarm only costs computing the file again."""
    for split, values in cached.items():
        first = list(range(min(batch_size, len(values))))
        fresh = forward(split, first)
        if not torch.allclose(fresh, values[first], rtol=1e-3, atol=1e-3):
            worst = float((fresh - values[first]).abs().max())
            raise BadCache(f"{split}: its first {len(first)} rows are not these pairs' reference log-probs "
                           f"(off by up to {worst:.3g}): shifted, or of other pairs")


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)


def preference_shape(first: dict[str, Any], source: str) -> str:
    """``explicit`` (prompt, chosen, rejected) or ``implicit`` (conversations sharing a prefix)."""
    keys = set(first)
    if not {"chosen", "rejected"} <= keys:
        raise ConfigError(f"{source}: DPO needs 'chosen' and 'rejected' columns (and 'prompt', or conversations that "
                          f"share their first turns); the first row has {sorted(keys)}")
    return "explicit" if "prompt" in keys else "implicit"


