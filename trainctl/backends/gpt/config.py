"""The ``gpt`` backend's ``[model]`` and ``[data]`` tables. Torch-free: ``config show`` and
``backends`` import this without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

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
class DataConfig:
    """``[data]``: token files made by ``trainctl prepare`` (``train.bin``, ``val.bin``,
    ``meta.json``). Empty ``path``: the embedded tiny-shakespeare corpus, character-level."""

    path: str = locked("")
