"""The ``gpt`` backend's ``[model]`` and ``[data]`` tables. Torch-free: ``config show`` and
``backends`` import this without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainctl.kernel.schema import locked, ranged


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """``[model]``: a GPT-2-style transformer. Shape keys are locked across a resume. The
    defaults are nanoGPT's CPU "baby GPT" (see configs/gpt2_small.toml for GPT-2's shape)."""

    n_layer: int = ranged(4, ge=1, lock=True)
    n_head: int = ranged(4, ge=1, lock=True)
    n_embd: int = ranged(128, ge=1, lock=True)
    block_size: int = ranged(64, ge=1, lock=True)
    bias: bool = locked(False)  # biases in Linear and LayerNorm (GPT-2 had them)
    vocab_size: int = ranged(0, ge=0, lock=True)  # 0 = the data's vocabulary size
    dropout: float = ranged(0.0, ge=0, lt=1)
    init_from: str = "scratch"  # scratch | path to a nanoGPT ckpt.pt

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceConfig:
    """``[[data.sources]]``: one prepared dataset of a mixture and its share of the samples."""

    path: str = ""  # a directory made by ``trainctl prepare`` (required: an empty one is refused)
    weight: float = ranged(1.0, ge=0)  # relative: the weights are normalized to sum to 1
    name: str = ""  # default: the directory's name; names the source in evaluations and the sample record

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name or self.path


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """``[data]``: token files made by ``trainctl prepare`` (``train.bin``, ``val.bin``,
    ``meta.json``). Empty ``path``: the embedded tiny-shakespeare corpus, character-level.
    ``sources``: instead of ``path``, a weighted mixture of prepared datasets
    (``trainctl/backends/gpt/mixture.py``)."""

    path: str = locked("")
    sources: tuple[SourceConfig, ...] = locked(())
    # a per-rank JSON line per step in the run directory: which samples the step trained on
    record_samples: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            return
        if self.path:
            raise ValueError(f"data.path ({self.path!r}) and data.sources are both set; keep one: a single "
                             "dataset in data.path, or every dataset of the mixture as a [[data.sources]] table")
        for i, source in enumerate(self.sources):
            if not source.path:
                raise ValueError(f"data.sources[{i}].path is empty; give a directory made by trainctl prepare")
        labels = [source.label for source in self.sources]
        twice = next((label for label in labels if labels.count(label) > 1), None)
        if twice is not None:
            raise ValueError(f"two data.sources are named {twice!r}; give each a distinct name = \"...\"")
        if not sum(source.weight for source in self.sources) > 0:
            raise ValueError("the weights of data.sources sum to 0; give at least one source a positive weight")
