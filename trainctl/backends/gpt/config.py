"""The ``gpt`` backend's ``[model]`` and ``[data]`` tables. Torch-free: ``config show`` and
``backends`` import this without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from trainctl.kernel.schema import locked


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """``[model]``: a GPT-2-style transformer. Shape keys are locked across a resume. The
    defaults are nanoGPT's CPU "baby GPT" (see configs/gpt2_small.toml for GPT-2's shape)."""

    n_layer: int = locked(4)
    n_head: int = locked(4)
    n_embd: int = locked(128)
    block_size: int = locked(64)
    bias: bool = locked(False)  # biases in Linear and LayerNorm (GPT-2 had them)
    vocab_size: int = locked(0)  # 0 = the data's vocabulary size
    dropout: float = 0.0
    init_from: str = "scratch"  # scratch | path to a nanoGPT ckpt.pt

    def __post_init__(self) -> None:
        if min(self.n_layer, self.n_head, self.n_embd, self.block_size) < 1:
            raise ValueError("n_layer, n_head, n_embd and block_size must be at least 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.vocab_size < 0:
            raise ValueError("vocab_size must be 0 (from the data) or positive")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """``[data]``: token files made by ``trainctl prepare`` (``train.bin``, ``val.bin``,
    ``meta.json``). Empty ``path``: the embedded tiny-shakespeare corpus, character-level."""

    path: str = locked("")
