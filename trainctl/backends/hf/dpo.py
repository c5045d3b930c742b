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
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainctl.backends.hf import sft
from trainctl.kernel.errors import ConfigError

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # what TRL's DataCollatorForPreference reads
REF_CACHE = "dpo_ref_logps.safetensors"


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

    # the seeded epoch order and Arrow row reads are SFTData's, unchanged (they read only
    # self.train, self.val, self.seed and self._orders)
    order = sft.SFTData.order
    indices = sft.SFTData.indices
    rows = sft.SFTData.rows

    def __init__(self, *, model: Any, ref_model: Any, tokenizer: Any, train_rows: list[dict], val_rows: list[dict] | None,
                 max_length: int, batch_size: int, seed: int, use_cpu: bool, peft_config: Any, reference: str,
                 beta: float, loss_type: str, label_smoothing: float) -> None:
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
        self.train = self._columns(self.trainer.train_dataset, "train")
        self.val = self._columns(self.trainer.eval_dataset, "val") if self.trainer.eval_dataset is not None else None
        self.seed = seed
        self._orders: dict[tuple[str, int], np.ndarray] = {}
        self.ref_logps: dict[str, torch.Tensor] = {}  # split -> (N, 2) chosen, rejected; precomputed only

    @staticmethod
    def _columns(ds: Any, split: str) -> Any:
        if len(ds) == 0:
            raise ConfigError(f"no {split} pairs are left after TRL's preparation (every prompt fills model.max_length)")
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
        cached = _read_cache(path, fingerprint)
        if cached is not None and set(cached) == set(splits):
            self.ref_logps = cached
            return f"precomputed, read from {path} (not recomputed)"
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for split, ds in splits.items():
                    batches = [list(range(first, min(first + batch_size, len(ds)))) for first in range(0, len(ds), batch_size)]
                    mine = list(range(rank, len(batches), world))
                    rounds = -(-len(batches) // world) if lockstep else len(mine)
                    parts: dict[int, torch.Tensor] = {}
                    for turn in range(rounds):
                        index = mine[turn] if turn < len(mine) else 0
                        batch = self.collate(self.rows(split, batches[index]))
                        with autocast:
                            chosen, rejected = self.reference_logps(sft.to_device(batch, device))
                        if turn < len(mine):
                            parts[index] = torch.stack([chosen, rejected], dim=1).float().cpu()
                    if world > 1:
                        parts = _exchange(parts, world)
                    self.ref_logps[split] = torch.cat([parts[i] for i in range(len(batches))])
        finally:
            self.model.train(was_training)
        if rank == 0:
            _write_cache(path, self.ref_logps, fingerprint)
        return f"precomputed from {source}" + (f" on {world} ranks" if world > 1 else "") + f", cached in {path}"

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


def _read_cache(path: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None  # other weights or data: computed again, and the file replaced
            return {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, ValueError, RuntimeError):  # truncated or not safetensors: compute again
        return None


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


