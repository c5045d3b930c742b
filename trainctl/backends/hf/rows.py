"""Reading fine-tuning rows: JSONL/JSON, Parquet, a ``datasets.save_to_disk`` directory or a
Hugging Face hub dataset id (``datasets.load_dataset``, from the cache when offline), the shape of
the rows, and the fixed validation split. Torch-free; ``datasets``/``pyarrow`` are
imported only for the formats that need them.

Rows stay plain Python dicts until validation has passed, so a bad row is reported by its line
in the file instead of failing inside Arrow's schema inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def read_data(data: Any) -> tuple[Rows, Rows | None]:
    """The rows of ``data.train`` and, when given, ``data.val`` (``data``: the hf DataConfig)."""
    train = read(data.train, "data.train", split=data.split, subset=data.subset)
    val = read(data.val, "data.val", split=data.val_split, subset=data.subset) if data.val else None
    return train, val


def _is_dataset_id(path: str) -> bool:
    """``owner/name`` or ``name`` as the hub spells them; anything path-like stays a path."""
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).suffix.lower() in FILE_SUFFIXES:
        return False
    return all(part and all(c.isalnum() or c in "-_." for c in part) for part in path.split("/"))


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def read(path: str, what: str, *, split: str = "train", subset: str = "") -> Rows:
    """All rows of ``path``; ``what`` names the config key for error messages. A path that does
    not exist but reads as a hub dataset id is loaded with ``datasets.load_dataset``."""
    p = Path(path).expanduser()
    if not path:
        raise ConfigError(f"{what} is not set; give a .jsonl, .parquet or saved-datasets path, e.g. --set {what}=data/train.jsonl")
    if not p.exists():
        if _is_dataset_id(path):
            return _read_hub(path, what, split=split, subset=subset)
        raise ConfigError(f"{what} {p} does not exist; check the path (or give a hub dataset id, e.g. trl-lib/Capybara)")
    if p.is_dir():
        return _read_saved(p)
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


def _read_saved(p: Path) -> Rows:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{p} is a directory but not a saved dataset ({exc}); give a datasets.save_to_disk directory or a file") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"{p} holds splits {sorted(loaded)} but no 'train'; point at one split's directory")
        loaded = loaded["train"]
    rows = loaded.to_list()
    return Rows(source=str(p), rows=rows, lines=list(range(1, len(rows) + 1)))


def _read_hub(name: str, what: str, *, split: str, subset: str) -> Rows:
    """One split of a hub dataset: downloaded once into the datasets cache, or read from it
    offline. Only data files are read: datasets no longer runs loading scripts."""
    import datasets
    from huggingface_hub import constants

    verbosity = datasets.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity_error()  # "using the latest cached version": the plan says where rows came from
    datasets.disable_progress_bars()
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
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
    rows = loaded.to_list()
    label = f"{name}[{subset + ':' if subset else ''}{split}]"
    return Rows(source=label, rows=rows, lines=list(range(1, len(rows) + 1)))


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
