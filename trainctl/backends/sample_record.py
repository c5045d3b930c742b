"""Which samples each rank trained on at each step (``data.record_samples``): a debug record,
so that a user or a test can show that a run killed and resumed trained every sample once.

One JSON line per step per rank, in ``RUN_DIR/samples-rank{N}.jsonl``: ``step`` (the kernel's
count after the step, as in ``events.jsonl``), ``rank``, and lists of one entry per sample that
the backend names. ``gpt``::

    {"step": 7, "rank": 0, "index": [g, ...], "source": ["web", ...], "offset": [o, ...]}

``index`` each row's global sample index, ``source`` and ``offset`` where its tokens start.
``hf`` (``trainctl/backends/hf/row_ids.py``)::

    {"step": 7, "rank": 0, "index": [i, ...], "epoch": [e, ...], "tokens": [n, ...]}

``index`` each training row's id (its index in the train split, or in the epoch's stream), the
epoch it was drawn in, and how many of its tokens the step trained. A run that starts at step
``k`` (0 fresh, the checkpoint's step when resumed) first cuts the files back to their lines of
steps up to ``k``: steps a killed run trained past its last checkpoint, which the resumed model
does not hold, leave the record. Rank 0 cuts the files of ranks the run no longer has (a resume
at a smaller world size); every other rank only its own. Each line goes to the file as it is
written (a ``write``, no fsync): a process killed after a step has its line in the page cache.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainctl.kernel.run_dir import NOFOLLOW, open_append

FILE = re.compile(r"samples-rank(\d+)\.jsonl")


def path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"samples-rank{rank}.jsonl"


class SampleRecord:
    def __init__(self, out_dir: Path, *, rank: int, world_size: int) -> None:
        self.out_dir, self.rank, self.world_size = out_dir, rank, world_size
        self.file = None

    def write(self, step: int, samples: Mapping[str, Sequence[int | str]]) -> None:
        """The samples this rank trains in the step that ends at count ``step``: host lists of
        one entry per sample each, under the names of the backend's line."""
        if self.file is None:
            self._start(step - 1)
        self.file.write(json.dumps({"step": step, "rank": self.rank, **samples}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _start(self, start: int) -> None:
        mine = [path(self.out_dir, self.rank)]
        if self.rank == 0:
            mine += [p for p in self.out_dir.glob("samples-rank*.jsonl")
                     if (m := FILE.fullmatch(p.name)) and int(m.group(1)) >= self.world_size]
        for file in mine:
            cut(file, start)
        self.file = open_append(mine[0], text=True)  # line-buffered


def cut(file: Path, last_step: int) -> None:
    """Truncate ``file`` after its lines of steps up to ``last_step`` (lines are in step order;
    a line cut short by a kill ends the kept part too)."""
    try:
        fd = os.open(file, os.O_RDWR | NOFOLLOW)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "rb+") as f:
        keep = 0
        for line in f:
            try:
                if json.loads(line)["step"] > last_step:
                    break
            except (ValueError, KeyError, TypeError):
                break
            keep += len(line)
        f.truncate(keep)


def read(out_dir: Path) -> dict[int, list[dict]]:
    """Every rank's lines, by step: what a check of the record reads."""
    steps: dict[int, list[dict]] = {}
    for file in sorted(out_dir.glob("samples-rank*.jsonl")):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).append(record)
    return steps
