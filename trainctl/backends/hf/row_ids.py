"""Which training rows each step of the ``hf`` backend trains (``data.record_samples``): every
row's id carried through TRL's preparation into the sample record (``backends/sample_record.py``).

A row's id is its index in the train split (the rows of ``data.train`` in file order, less those
``data.val_fraction`` holds out) or, streamed, its index in the epoch's stream (after the epoch's
file order: the rows datasets' saved position counts). It is a column, :data:`ID`, added before
TRL prepares the rows (:func:`number`); TRL's maps keep it and its filter of fully masked rows
drops it with its row. Packing is where identity is lost: TRL keeps only ``input_ids`` and
``labels`` when it packs. With ids on, :func:`trainer_class`'s preparation packs as TRL does (the
rows tokenized and labelled by TRL, not cut, then ``trl.pack_dataset``, which cuts at
``max_length``) with the id repeated for every token as a third column, which BFD and wrapped
packing move exactly as they move ``input_ids`` (the packed rows equal TRL's: a test checks).

A packed row holds a run of tokens of each row in it: under BFD the whole row (cut at
``max_length``); wrapped packing cuts a row at a packed sequence's end and goes on with it in the
next, possibly in the next step or on another rank: the row is listed with each, with the tokens
each holds (the tokens of its listings sum to its length).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ID = "trainctl_row"  # the id column, through preparation; never collated


def number(ds: Any) -> Any:
    """``ds`` (a ``Dataset`` or a stream of raw rows) with each row's index as its :data:`ID`; a
    stream's count is part of its position (``state_dict``), so a resumed stream counts on."""
    from datasets import Dataset

    if isinstance(ds, Dataset):
        return ds.add_column(ID, np.arange(len(ds)))
    return ds.map(lambda _, i: {ID: i}, with_indices=True)


def trainer_class() -> type:
    """``SFTTrainer`` whose preparation keeps :data:`ID` through packing; rows without it are
    prepared by TRL's own code, untouched."""
    from datasets import Dataset
    from trl import SFTTrainer, pack_dataset
    from trl.data_utils import get_dataset_column_names

    class IdentifiedSFTTrainer(SFTTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, packing: bool,
                             formatting_func: Any, dataset_name: str) -> Any:
            if not packing or ID not in get_dataset_column_names(dataset):
                return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
            whole = copy.copy(args)
            whole.max_length = None  # neither cut nor filtered: TRL's packed preparation does neither, packing cuts
            rows = super()._prepare_dataset(dataset, processing_class, whole, False, formatting_func, dataset_name)
            map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(rows, Dataset) else {}  # as TRL's (a stream has none)
            rows = rows.map(_per_token, batched=True, **map_kwargs)
            # as TRL packs (SFTData never sets shuffle_dataset, the shuffle TRL would do here)
            return pack_dataset(rows.select_columns(["input_ids", "labels", ID]), args.max_length, args.packing_strategy, map_kwargs)

    return IdentifiedSFTTrainer


def _per_token(batch: dict[str, list]) -> dict[str, list]:
    return {ID: [[i] * len(ids) for i, ids in zip(batch[ID], batch["input_ids"])]}


@dataclass(frozen=True, slots=True)
class RowIds:
    """The rows whose tokens each prepared row holds: prepared row ``r`` holds runs
    ``start[r] .. start[r + 1] - 1``, each a row ``index`` and its ``tokens`` in ``r``."""

    start: np.ndarray  # (R + 1,)
    index: np.ndarray  # (runs,)
    tokens: np.ndarray  # (runs,)

    @classmethod
    def of(cls, ids: Sequence[Any], lengths: Sequence[int]) -> RowIds:
        """From each prepared row's :data:`ID` (an int, or one per token when packed) and length."""
        if not ids or not isinstance(ids[0], list):
            return cls(np.arange(len(ids) + 1), np.asarray(ids, dtype=np.int64), np.asarray(lengths, dtype=np.int64))
        return cls.runs(np.concatenate([np.asarray(i, dtype=np.int64) for i in ids]), np.cumsum([0, *map(len, ids)]))

    @classmethod
    def runs(cls, flat: np.ndarray, offsets: np.ndarray) -> RowIds:
        """From the per-token ids of packed rows, flat, row ``r`` at ``offsets[r] .. offsets[r + 1] - 1``."""
        starts = np.union1d(np.flatnonzero(flat[1:] != flat[:-1]) + 1, offsets[:-1])  # a run starts at a row or a new id
        return cls(np.searchsorted(starts, offsets), flat[starts], np.diff(np.append(starts, len(flat))))

    @classmethod
    def read(cls, ds: Any) -> RowIds:
        """From a prepared ``Dataset`` (its :data:`ID` and ``input_ids`` columns, in its row order)."""
        import pyarrow.compute as pc

        table = ds.with_format("arrow")[:]
        column = table[ID].combine_chunks()
        if not hasattr(column, "flatten"):
            lengths = pc.list_value_length(table["input_ids"]).to_numpy()
            return cls(np.arange(len(column) + 1), column.to_numpy(), lengths)
        offsets = np.cumsum(np.append(0, pc.list_value_length(column).to_numpy()))
        return cls.runs(column.flatten().to_numpy(), offsets)

    def line(self, rows: Sequence[int], epochs: Sequence[int]) -> dict[str, list[int]]:
        """The sample record's lists for prepared ``rows``, drawn in ``epochs`` (one each)."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.start[rows + 1] - self.start[rows]
        runs = np.concatenate([np.arange(self.start[r], self.start[r + 1]) for r in rows]) if len(rows) else np.zeros(0, np.int64)
        return {"index": self.index[runs].tolist(), "epoch": np.repeat(np.asarray(epochs, dtype=np.int64), counts).tolist(),
                "tokens": self.tokens[runs].tolist()}
