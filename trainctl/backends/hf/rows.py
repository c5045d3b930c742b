"""Reading fine-tuning rows: JSONL/JSON, Parquet, a ``datasets.save_to_disk`` directory, a folder
of data files, a datasets builder with its files or a Hugging Face hub dataset id
(``datasets.load_dataset``, from the cache when offline), the shape of the rows, and the fixed
validation split. Torch-free; ``datasets``/``pyarrow`` are imported only for the formats that
need them.

Rows stay plain Python dicts until validation has passed, so a bad row is reported by its line
in the file (its 1-based row index for what datasets reads) instead of failing inside Arrow's
schema inference.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from trainctl.kernel.errors import ConfigError

SHAPES = ("text", "messages", "prompt_completion")


@dataclass(slots=True)
class Rows:
    """Rows of one file and the line (1-based) each came from; ``bad`` holds lines that did not
    parse, as (line, why), for the validation report."""

    source: str
    rows: list[dict[str, Any]]
    lines: list[int]
    bad: list[tuple[int, str]] = field(default_factory=list)

    def take(self, indices: list[int], source: str) -> Rows:
        return Rows(source=source, rows=[self.rows[i] for i in indices], lines=[self.lines[i] for i in indices])


#: rows a backend built only to load a checkpoint (``BackendContext.load_only``) builds TRL's
#: trainer from: it trains and evaluates none of them
LOAD_ROWS = 64


def first_rows(found: Rows) -> Rows:
    """The first :data:`LOAD_ROWS` rows of ``found``."""
    return found.take(list(range(min(LOAD_ROWS, len(found.rows)))), found.source)


def read_data(data: Any) -> tuple[Rows, Rows | None]:
    """The rows of ``data.train`` and, when given, ``data.val`` (``data``: the hf DataConfig)."""
    if data.val_files and not data.val:
        raise ConfigError('data.val_files is set but data.val is not, so they would be ignored; '
                          'set data.val = "json" (the builder of those files) or drop data.val_files')
    train = read(data.train, "data.train", split=data.split, subset=data.subset, files=data.data_files)
    val = read(data.val, "data.val", split=data.val_split, subset=data.subset, files=data.val_files) if data.val else None
    return train, val


def _is_dataset_id(path: str) -> bool:
    """``owner/name`` or ``name`` as the hub spells them; anything path-like stays a path."""
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).suffix.lower() in FILE_SUFFIXES:
        return False
    return all(part and all(c.isalnum() or c in "-_." for c in part) for part in path.split("/"))


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")
#: datasets' packaged builders of row files, named in data.train / data.val with data.data_files /
#: data.val_files; load_dataset resolves these names before any path, and so does ``read``
BUILDERS = ("json", "parquet", "csv", "text", "arrow")
#: per key read: the key of its split, that key's default, and the key of its builder's files
_KEYS = {"data.train": ("data.split", "train", "data.data_files"), "data.val": ("data.val_split", "test", "data.val_files")}


def read(path: str, what: str, *, split: str = "train", subset: str = "", files: tuple[str, ...] = ()) -> Rows:
    """All rows of ``path`` (of its ``split`` where it holds several); ``what`` names the config
    key for error messages. A builder name reads ``files``; a path that does not exist but reads
    as a hub dataset id is loaded with ``datasets.load_dataset``."""
    files_key = _KEYS.get(what, _KEYS["data.train"])[2]
    if path in BUILDERS:
        return _read_builder(path, what, split=split, subset=subset, files=files)
    if files:
        raise ConfigError(f"{files_key} is set but {what} = {path!r} is not a datasets builder, so they would be ignored; "
                          f"set {what} to one of {', '.join(BUILDERS)} or drop {files_key}")
    p = Path(path).expanduser()
    if not path:
        raise ConfigError(f"{what} is not set; give a .jsonl, .parquet or saved-datasets path, e.g. --set {what}=data/train.jsonl")
    if not p.exists():
        if _is_dataset_id(path):
            return _read_hub(path, what, split=split, subset=subset)
        raise ConfigError(f"{what} {p} does not exist; check the path (or give a hub dataset id, e.g. trl-lib/Capybara)")
    if p.is_dir():
        return _read_saved(p, what, split) if _is_saved(p) else _read_folder(p, what, split=split, subset=subset)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_json(p)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise ConfigError(f"{what} {p} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        return Rows(source=str(p), rows=rows, lines=list(range(1, len(rows) + 1)))
    raise ConfigError(f"{what} {p}: unknown format {suffix!r}; use .jsonl, .json, .parquet or a datasets directory")


def _read_json(p: Path) -> Rows:
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p} is not valid JSON: {exc}") from None
        objects = [(i + 1, r) for i, r in enumerate(rows)]
        return _objects(p, objects, [])
    objects, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            objects.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            bad.append((number, f"invalid JSON ({exc.msg} at column {exc.colno})"))
    return _objects(p, objects, bad)


def _objects(p: Path, objects: list[tuple[int, Any]], bad: list[tuple[int, str]]) -> Rows:
    rows, lines = [], []
    for number, obj in objects:
        if isinstance(obj, dict):
            rows.append(obj)
            lines.append(number)
        else:
            bad.append((number, f"a row must be a JSON object, got {type(obj).__name__}"))
    return Rows(source=str(p), rows=rows, lines=lines, bad=bad)


@contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """datasets with its progress bars and logs off ("using the latest cached version", "Failed to
    load JSON from file"): the plan says where rows came from, and a failure is one ConfigError."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _is_saved(p: Path) -> bool:
    """A ``save_to_disk`` directory, as ``datasets.load_from_disk`` recognises one."""
    import datasets

    saved_dataset = (p / datasets.config.DATASET_INFO_FILENAME).is_file() and (p / datasets.config.DATASET_STATE_JSON_FILENAME).is_file()
    return saved_dataset or (p / datasets.config.DATASETDICT_JSON_FILENAME).is_file()


def _read_saved(p: Path, what: str, split: str) -> Rows:
    """A ``save_to_disk`` directory: one split of a DatasetDict, or the whole of a Dataset (which
    has no splits to choose from)."""
    with _quiet_datasets() as datasets:
        loaded = _local(what, str(p), datasets.load_from_disk, str(p))
    if isinstance(loaded, datasets.DatasetDict):
        return _rows(_pick(loaded, split, what, str(p)), f"{p}[{split}]")
    return _rows(loaded, str(p))


def _read_folder(p: Path, what: str, *, split: str, subset: str) -> Rows:
    """A folder of data files, read as ``load_dataset(folder)`` (and so ``trl sft``) reads it: the
    builder from the files' format, the splits from their names (train.jsonl + test.jsonl)."""
    with _quiet_datasets() as datasets:
        loaded = _local(what, str(p), datasets.load_dataset, str(p), subset or None)
    return _rows(_pick(loaded, split, what, str(p)), f"{p}[{split}]")


def _read_builder(builder: str, what: str, *, split: str, subset: str, files: tuple[str, ...]) -> Rows:
    """``load_dataset(builder, data_files=[...])``: the files make one split, which load_dataset
    names "train". Each pattern must match a file: datasets drops a glob that matches nothing
    while another matches, and fails with a bare StopIteration when none does."""
    split_key, split_default, files_key = _KEYS.get(what, _KEYS["data.train"])
    if not files:
        raise ConfigError(f'{what} = "{builder}" is a datasets builder: set {files_key} = ["..."] (its files: paths or globs)')
    if split not in ("train", split_default):
        raise ConfigError(f'{split_key} = "{split}" names a split, but {files_key} make one split ("train"); drop {split_key}')
    patterns = [os.path.expanduser(f) for f in files]
    label = f"{builder}[{', '.join(patterns)}]"
    with _quiet_datasets() as datasets:
        from datasets.data_files import resolve_pattern  # load_dataset's own resolution, from the working directory

        for pattern in patterns:
            try:
                resolve_pattern(pattern, base_path=os.getcwd())
            except FileNotFoundError:
                raise ConfigError(f"{files_key} {pattern!r} matches no file (relative to {os.getcwd()}); check the path or glob") from None
        loaded = _local(what, label, datasets.load_dataset, builder, subset or None, data_files=patterns)
    return _rows(loaded["train"], label)


def _local(what: str, label: str, load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)`` of local data, its failures (a missing or malformed file, files of
    mixed formats, Arrow's parse errors) as one line."""
    import datasets
    import pyarrow

    try:
        return load(*args, **kwargs)
    except (OSError, ValueError, datasets.exceptions.DatasetsError, pyarrow.ArrowException) as exc:
        cause = exc.__cause__ if isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__ else exc
        raise ConfigError(f"{what} {label}: datasets cannot read it ({type(cause).__name__}: {_first_line(cause)}); "
                          f"fix the file, or give .jsonl, .json, .parquet or .csv files of one format") from None


def _pick(loaded: Any, split: str, what: str, label: str) -> Any:
    """One split of a DatasetDict, indexed by name as TRL's scripts index theirs."""
    if split not in loaded:
        split_key = _KEYS.get(what, _KEYS["data.train"])[0]
        raise ConfigError(f"{what} {label} has no split {split!r}; its splits are {', '.join(loaded)}: set {split_key} to one of them")
    return loaded[split]


def _rows(dataset: Any, source: str) -> Rows:
    rows = dataset.to_list()
    return Rows(source=source, rows=rows, lines=list(range(1, len(rows) + 1)))


def _read_hub(name: str, what: str, *, split: str, subset: str) -> Rows:
    """One split of a hub dataset: downloaded once into the datasets cache, or read from it
    offline. Only data files are read: datasets no longer runs loading scripts."""
    from huggingface_hub import constants

    with _quiet_datasets() as datasets:
        try:
            loaded = datasets.load_dataset(name, subset or None, split=split)
        except (ConnectionError, FileNotFoundError) as exc:
            if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
                raise ConfigError(
                    f"{what} {name!r} is not a local path and not in the datasets cache (offline: HF_HUB_OFFLINE is set); "
                    f"load it once online, or give a .jsonl/.parquet file"
                ) from None
            raise ConfigError(f"{what} {name!r}: no such local path, and the hub has no such dataset ({_first_line(exc)}); check the id") from None
        except ValueError as exc:  # an unknown split or subset
            raise ConfigError(f"{what} {name!r}: {_first_line(exc)}; set data.split / data.val_split / data.subset") from None
    label = f"{name}[{subset + ':' if subset else ''}{split}]"
    return _rows(loaded, label)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def detect_shape(rows: Rows, shape: str, text_field: str) -> str:
    """The shape named in the config, or the one the first row's keys show."""
    if shape != "auto":
        return shape
    if not rows.rows:
        raise ConfigError(f"{rows.source} has no rows; give a file with at least one JSON object per line")
    keys = set(rows.rows[0])
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if text_field in keys:
        return "text"
    raise ConfigError(
        f"cannot tell the shape of {rows.source} from its first row's keys {sorted(keys)}: expected 'messages', "
        f"'prompt' + 'completion', or '{text_field}'; rename the columns or set data.shape and data.text_field"
    )


def split(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows | None]:
    """Hold out ``fraction`` of the rows, chosen by ``seed`` only: the same rows whatever the
    run's seed, step or number of ranks, so a resumed run validates on the same split."""
    if fraction <= 0:
        return rows, None
    n = len(rows.rows)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ConfigError(f"{rows.source} has {n} rows: too few to hold out data.val_fraction {fraction}; lower it or give data.val")
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(int(i) for i in order[:n_val])
    held = set(val)
    train = [i for i in range(n) if i not in held]
    label = f"{rows.source} ({fraction:g} held out, split_seed {seed})"
    return rows.take(train, rows.source), rows.take(val, label)
