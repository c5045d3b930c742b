"""Training rows read as a stream (``data.streaming = true``): data files too big to load, read
with ``datasets.load_dataset(..., streaming=True)`` and prepared by TRL on the fly (chat
template, masks, truncation, packing: ``SFTTrainer``'s own pipeline on an ``IterableDataset``).

Which rows make a step: the stream's rows in order, ``batch_size x grad_accum`` per step (every
rank reads the whole stream and keeps its micro-batches, so the order is the same at any world
size), running over an epoch's end into the next pass. ``data.shuffle`` reorders the *files* per
epoch, by a NumPy permutation of (seed, epoch); rows keep their order within a file. No shuffle
buffer: datasets loses it on resume (datasets #7444).

Where a resumed run goes on: ``datasets``' own resumable position (``IterableDataset.state_dict``,
exact through TRL's batched tokenize and pack maps), taken at the start of every step, saved in
the checkpoint with the epoch, the ``num_tokens`` count and the files it was read from (paths
and sizes); a resume whose files differ is refused. With ``data.record_samples`` the stream numbers
its rows (``row_ids.py``), which adds that count to the position: a resume that turns the record on
or off is refused too.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainctl.backends.hf.row_ids import ID, RowIds, number
from trainctl.kernel.errors import ConfigError

CHECK_ROWS = 1000  # rows at the head of the stream validated (and read for the shape) before the model loads
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class Source:
    """The files of ``data.train`` a stream reads, and datasets' builder for them."""

    builder: str
    files: tuple[str, ...]  # absolute, in the order of an unshuffled epoch
    label: str

    def fingerprint(self) -> list[list[Any]]:
        """What a saved position is valid for: every file's path and size."""
        return [[f, os.stat(f).st_size] for f in self.files]

    def raw(self, epoch: int, shuffle: bool, seed: int) -> Any:
        """The unprepared rows of one epoch: the files in order, or permuted by (seed, epoch)."""
        import datasets

        files = list(self.files)
        if shuffle:
            files = [files[i] for i in np.random.default_rng((seed, epoch)).permutation(len(files))]
        return datasets.load_dataset(self.builder, data_files=files, split="train", streaming=True)


def source(data: Any) -> Source:
    """``data.train`` as a stream's files: one .jsonl/.json/.parquet/.csv file, a folder of them
    (every file of one format, sorted by name), or a builder name with ``data.data_files``."""
    path = data.train
    if path in BUILDERS.values():
        if not data.data_files:
            raise ConfigError(f'data.train = "{path}" is a datasets builder: set data.data_files = ["..."] (its files: paths or globs)')
        files = []
        for pattern in data.data_files:
            found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not found:
                raise ConfigError(f"data.data_files {pattern!r} matches no file (relative to {os.getcwd()}); check the path or glob")
            files += found
        return _source(path, files, f"{path}[{', '.join(data.data_files)}]")
    if data.data_files:
        raise ConfigError(f"data.data_files is set but data.train = {path!r} is not a datasets builder; set data.train "
                          f"to one of {', '.join(sorted(set(BUILDERS.values())))} or drop data.data_files")
    p = Path(path).expanduser()
    if not path or not p.exists():
        raise ConfigError(f"data.train {path!r} does not exist; data.streaming reads local files: a .jsonl, .parquet "
                          "or .csv file, a folder of them, or a builder with data.data_files")
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in BUILDERS)
        if not files:
            raise ConfigError(f"data.train {p} holds no .jsonl, .json, .parquet or .csv file to stream")
        suffixes = {BUILDERS[Path(f).suffix.lower()] for f in files}
        if len(suffixes) > 1:
            raise ConfigError(f"data.train {p} mixes formats ({', '.join(sorted(suffixes))}); stream files of one format")
        return _source(suffixes.pop(), files, str(p))
    builder = BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise ConfigError(f"data.train {p}: data.streaming reads .jsonl, .json, .parquet or .csv files, not {p.suffix or 'this file'}")
    return _source(builder, [str(p)], str(p))


def _source(builder: str, files: list[str], label: str) -> Source:
    bad = [f for f in files if not os.path.isfile(f)]  # a FIFO or a folder matched by a glob
    if bad:
        raise ConfigError(f"data.train: {bad[0]} is not a regular file; stream regular files only")
    return Source(builder=builder, files=tuple(os.path.abspath(f) for f in files), label=label)


def check(data: Any, train: Any) -> None:
    """What a stream cannot do, as one line each, before anything loads (``train``: TrainConfig)."""
    if not data.val and data.val_fraction > 0:
        raise ConfigError("data.streaming cannot hold data.val_fraction of a stream out for validation; "
                          "give data.val (a file) or set data.val_fraction = 0")
    if data.epochs:
        raise ConfigError("data.epochs needs the number of rows, which a stream does not know; set train.max_steps instead")
    if data.epoch_end == "short_step":
        raise ConfigError('data.epoch_end = "short_step" needs the number of rows, which a stream does not know; use "continue"')
    if data.order == "trl":
        raise ConfigError('data.order = "trl" draws a permutation of all rows, which a stream cannot; '
                          'with data.streaming, data.shuffle reorders the files each epoch')
    if not train.eval_steps:
        raise ConfigError("train.eval_steps = 0 scores every row, and a stream has no end; set train.eval_steps")


def head(src: Source, n: int) -> list[dict[str, Any]]:
    """The first ``n`` unprepared rows of an unshuffled epoch (validation and the data's shape)."""
    return _read(src, lambda: list(itertools.islice(src.raw(0, False, 0), n)))


def _read(src: Source, read: Callable[[], Any]) -> Any:
    """``read()`` with datasets' and Arrow's failures on a bad file as one line."""
    import datasets
    import pyarrow

    try:
        return read()
    except (OSError, ValueError, datasets.exceptions.DatasetsError, pyarrow.ArrowException) as exc:
        cause = exc.__cause__ if isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__ else exc
        said = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ConfigError(f"data.train {src.label}: datasets cannot stream it ({type(cause).__name__}: {said}); fix the file") from None


@dataclass(slots=True)
class _Read:
    rows: list[dict[str, Any]]
    start: dict[str, Any]  # the position before the step's first row
    tokens: int  # TRL's num_tokens after the step
    ids: RowIds | None  # with the rows numbered: the rows of the stream each row holds
    epochs: list[int]  # the epoch each row was read in


class TrainStream:
    """The prepared training rows of step after step. Steps are read in order, once; a step read
    ahead (the plan samples the first ones) is kept until :meth:`trained`."""

    def __init__(self, *, src: Source, prepare: Callable[[Any], Any], columns: tuple[str, ...], shuffle: bool,
                 seed: int, batch_size: int, grad_accum: int, identify: bool = False) -> None:
        """``identify``: number the rows, for :meth:`recorded`."""
        self.src, self.prepare, self.identify = src, prepare, identify
        self.columns = (*columns, ID) if identify else columns
        self.shuffle, self.seed = shuffle, seed
        self.batch_size, self.rows_per_step = batch_size, batch_size * grad_accum
        self.next = 0  # the next step to read
        self.tokens = 0  # input tokens of every row read so far (TRL's num_tokens)
        self.read: dict[int, _Read] = {}
        self._open(0)

    def _open(self, epoch: int, position: dict[str, Any] | None = None) -> None:
        self.epoch, self.rows_in_epoch = epoch, 0
        raw = self.src.raw(epoch, self.shuffle, self.seed)
        self.ds = self.prepare(number(raw) if self.identify else raw)
        if position is not None:
            self.ds.load_state_dict(position)
            self.rows_in_epoch = 1  # resumed inside an epoch that had rows
        self.rows: Iterator[dict[str, Any]] = iter(self.ds)

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "datasets": self.ds.state_dict(), "tokens": self.tokens, "ids": self.identify}

    def _row(self) -> dict[str, Any]:
        while True:
            row = next(self.rows, None)
            if row is not None:
                self.rows_in_epoch += 1
                return {k: row[k] for k in self.columns if k in row}
            if not self.rows_in_epoch:
                raise ConfigError(f"data.train {self.src.label}: no rows are left after TRL's preparation in epoch {self.epoch}")
            self._open(self.epoch + 1)

    def step(self, step: int) -> list[list[dict[str, Any]]]:
        """The rows of every micro-batch of ``step`` (all ranks')."""
        while self.next <= step:
            start = self.position()
            rows, epochs = [], []
            for _ in range(self.rows_per_step):
                rows.append(_read(self.src, self._row))
                epochs.append(self.epoch)  # after the read: a row that opened the next epoch is of it
            self.tokens += sum(len(r["input_ids"]) for r in rows)
            ids = RowIds.of([r.pop(ID) for r in rows], [len(r["input_ids"]) for r in rows]) if self.identify else None
            self.read[self.next] = _Read(rows=rows, start=start, tokens=self.tokens, ids=ids, epochs=epochs)
            self.next += 1
        if step not in self.read:
            raise RuntimeError(f"step {step} of the stream was already trained; the stream is at step {self.next}")
        rows = self.read[step].rows
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def recorded(self, step: int, micro: list[int]) -> dict[str, list[int]]:
        """The sample record's lists for micro-batches ``micro`` of ``step`` (read, not yet trained)."""
        read = self.read[step]
        rows = [m * self.batch_size + j for m in micro for j in range(self.batch_size)]
        return read.ids.line(rows, [read.epochs[r] for r in rows])

    def trained(self, step: int) -> int:
        """``step`` was trained: its rows are let go. TRL's ``num_tokens`` after it."""
        tokens = self.read[step].tokens
        for done in [s for s in self.read if s <= step]:
            del self.read[done]
        return tokens

    # --- checkpoints --------------------------------------------------------------------------

    def state(self, step: int) -> dict[str, Any]:
        """The position before ``step`` (the next step a resumed run trains), and what it is valid for."""
        start = self.read[step].start if step in self.read else self.position() if step == self.next else None
        if start is None:
            raise RuntimeError(f"the stream's position before step {step} is gone (the stream is at step {self.next})")
        return {"step": step, **start, "files": self.src.fingerprint()}

    def restore(self, state: Any, directory: Path, step: int) -> None:
        """Go on at ``step`` from a checkpoint's ``state`` (of :meth:`state`): a hostile file until checked."""
        where = f"checkpoint {directory}"
        if not isinstance(state, dict):
            raise ConfigError(f"{where} holds no stream position; it was trained with data.streaming = false: "
                              "resume with data.streaming = false, or start a new run from its weights")
        files = state.get("files")
        numbered = state.get("ids", False)  # written before the record existed: not numbered
        if type(numbered) is bool and numbered != self.identify:
            was = str(numbered).lower()
            raise ConfigError(f"{where} streamed with data.record_samples = {was}, and the record numbers a stream's rows in "
                              f"its position; resume with data.record_samples = {was}, or start a new run from its weights")
        if files != self.src.fingerprint():
            raise ConfigError(f"{where} streamed other files than data.train {self.src.label} is now (paths or sizes "
                              "differ): its position would point at other rows; restore the files, or start a new run from its weights")
        epoch, tokens = state.get("epoch"), state.get("tokens")
        if (state.get("step") != step or not all(type(v) is int and v >= 0 for v in (epoch, tokens))
                or not isinstance(state.get("datasets"), dict) or type(numbered) is not bool):
            raise ConfigError(f"{where}: its stream position is malformed (step, epoch, tokens, datasets, ids); it was not written by trainctl")
        try:
            self._open(epoch, state["datasets"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"{where}: datasets cannot restore its stream position ({type(exc).__name__}: {exc})") from None
        self.next, self.tokens = step, tokens
        self.read.clear()
