"""The ``gpt`` backend's data as a weighted mixture of prepared datasets, and the order its
samples are drawn in. One dataset (``data.path``) is a mixture of one.

Sample ``g`` of a run is row ``b`` of micro-batch ``m`` of step ``s``::

    g      = (s * grad_accum + m) * batch_size + b          # m numbered over all ranks
    source = source_of(seed, g)                             # stratified over the weights
    start  = default_rng((seed, s, m)).integers(0, len(source's tokens) - block_size)

The offsets come from the micro-batch's generator as ``data.batch_starts`` always drew them (a
single source gives the very batches it gave), so both are pure functions of the seed and the
sample's place in the run: any number of ranks, a resume or a restart sees the same samples,
with nothing to save but the step.

The source of ``g`` is where a golden-ratio (Weyl) sequence, started at a point the seed picks,
falls among the cumulative weights: over any ``n`` consecutive samples each source's count is
within a few of ``n * w`` (the sequence's discrepancy grows as ``log n``), where independent
draws would stray by ``sqrt(n w (1 - w))``, 0.5 % of 10k samples at ``w = 1/2``.

Validation: ``val`` is drawn from the sources' val splits with the training weights (the loss
the mixture trains on; ``best`` checkpoints follow it), and with more than one source each
source's val is scored alone as ``val.NAME``.

Shards stay memory-mapped. Pages a read touches stay mapped in the process (its RSS grows
towards the size of the data, though the kernel may drop them at any time); every
``RESIDENT_BYTES`` mapped, ``windows`` unmaps them (``MADV_DONTNEED``: they stay in the page
cache, the next read maps them again), so the data's share of the RSS stays bounded at any
data size (``bench/mixture_rss.py``).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainctl.backends.gpt import data as gpt_data
from trainctl.kernel.errors import ConfigError

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd: the Weyl step that spreads most evenly
MIXTURE_KEY = 0x6D6978  # "mix": the seed's generator for the sequence's starting point
RESIDENT_BYTES = 64 << 20  # mapped, at most, between unmappings (counted as FAULT_BYTES a window)
# the most one window's page fault maps into the process: a 2 MB folio of the page cache (Linux 6
# maps large folios whole; measured 1.5-1.7 MB a random window, MADV_RANDOM or not)
FAULT_BYTES = 2 << 20


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    train: np.ndarray  # flat token ids, memory-mapped
    val: np.ndarray


@dataclass(frozen=True, slots=True)
class Draw:
    """One micro-batch's samples, each (B,): global index, source number, first token."""

    index: np.ndarray
    source: np.ndarray
    start: np.ndarray

    @classmethod
    def joined(cls, draws: list[Draw]) -> Draw:
        """A step's micro-batches as one: their rows in order."""
        return cls(*(np.concatenate([getattr(d, f) for d in draws]) for f in ("index", "source", "start")))


class Mixture:
    """The sources, their normalized weights and the tokenizer's ``meta`` they share."""

    def __init__(self, sources: list[Source], weights: list[float], meta: dict[str, Any], seed: int) -> None:
        self.sources, self.meta = sources, meta
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.bounds = np.cumsum(self.weights)[:-1]  # source k takes u in [bounds[k-1], bounds[k])
        self.origin = np.uint64(np.random.default_rng((seed, MIXTURE_KEY)).bit_generator.random_raw())
        self.lengths = {split: np.array([len(getattr(s, split)) for s in sources]) for split in ("train", "val")}
        self.mapped = 0  # bytes mapped since the last unmapping (an estimate from above)
        self.dtype = np.result_type(*(s.train.dtype for s in sources))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def source_of(self, index: np.ndarray) -> np.ndarray:
        """The source of each global sample index: a pure function of (seed, index)."""
        if len(self.sources) == 1:
            return np.zeros(len(index), dtype=np.int64)
        x = self.origin + index.astype(np.uint64) * GOLDEN  # modulo 2^64 (numpy wraps arrays silently)
        u = (x >> np.uint64(11)).astype(np.float64) * 2.0**-53  # the top 53 bits, in [0, 1)
        return np.searchsorted(self.bounds, u, side="right")

    def draw(self, split: str, block: int, batch_size: int, seed: int, step: int, micro: int, micro_per_step: int,
             *, source: int | None = None) -> Draw:
        """Micro-batch ``micro`` of step ``step`` (``micro_per_step`` = ``train.grad_accum``);
        ``source``: that source alone (its own evaluation)."""
        first = ((step * micro_per_step + micro) * batch_size) % 2**64  # evaluation "steps" lie near 2^32
        index = np.arange(batch_size, dtype=np.uint64) + np.uint64(first)
        which = self.source_of(index) if source is None else np.full(batch_size, source, dtype=np.int64)
        start = gpt_data.batch_starts(self.lengths[split][which], block, batch_size, seed, step, micro)
        return Draw(index=index.astype(np.int64), source=which, start=start)

    def windows(self, split: str, draw: Draw, block: int) -> np.ndarray:
        """The (B, block + 1) token windows of ``draw`` as int64: inputs and next-token targets."""
        arrays = [getattr(s, split) for s in self.sources]
        out = np.empty((len(draw.start), block + 1), dtype=self.dtype)  # (B, T+1)
        for row, (k, o) in enumerate(zip(draw.source.tolist(), draw.start.tolist())):
            out[row] = arrays[k][o : o + block + 1]  # a page fault maps up to FAULT_BYTES around it
            self.mapped += FAULT_BYTES
            if self.mapped > RESIDENT_BYTES:  # mid-batch too: the rows so far are copied out
                self.unmap()
        return out.astype(np.int64)

    def unmap(self) -> None:
        """Drop the pages the sources' maps hold from this process (not from the page cache)."""
        self.mapped = 0
        for s in self.sources:
            for arr in (s.train, s.val):
                mapped = getattr(arr, "_mmap", None)  # np.memmap's own mmap.mmap; None for in-memory arrays
                if mapped is not None and hasattr(mapped, "madvise"):
                    mapped.madvise(mmap.MADV_DONTNEED)


def load(config: Any, seed: int) -> Mixture:
    """The data of a gpt ``[data]`` table: ``data.sources`` if set, else ``data.path`` alone.
    A missing source or sources that do not share a tokenizer are a one-line ConfigError."""
    if not config.sources:
        one = gpt_data.load(config.path)
        name = Path(config.path).name if config.path else "embedded"
        return Mixture([Source(name, one.train, one.val)], [1.0], one.meta, seed)
    sources, metas = [], []
    for i, sc in enumerate(config.sources):
        where = f"data.sources[{i}] ({sc.label!r})"
        if not Path(sc.path).exists():
            raise ConfigError(f"{where}: {sc.path} does not exist; prepare it: trainctl prepare TEXT_FILE --out {sc.path}")
        try:
            one = gpt_data.load(sc.path)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if metas and _vocabulary(one.meta) != _vocabulary(metas[0]):
            raise ConfigError(
                f"{where} has {_describe(one.meta)} but data.sources[0] ({config.sources[0].label!r}) has "
                f"{_describe(metas[0])}; a mixture's sources must share one vocabulary: prepare every one with the "
                "same --tokenizer (byte or gpt2: a char vocabulary is the characters of its own text)"
            )
        sources.append(Source(sc.label, one.train, one.val))
        metas.append(one.meta)
    weights = [sc.weight for sc in config.sources]
    total = sum(weights)
    shares = ", ".join(f"{s.name} {w / total:.0%}" for s, w in zip(sources, weights))
    meta = {k: v for k, v in metas[0].items() if k not in ("train_tokens", "val_tokens")} | {"source": f"mixture: {shares}"}
    return Mixture(sources, weights, meta, seed)


def _vocabulary(meta: dict[str, Any]) -> tuple[Any, ...]:
    return meta.get("tokenizer"), int(meta.get("vocab_size", 0)), meta.get("chars")


def _describe(meta: dict[str, Any]) -> str:
    kind = meta.get("tokenizer")
    own = " of its own characters" if kind == "char" else ""
    return f"the {kind} tokenizer (vocabulary {meta.get('vocab_size')}{own})"
