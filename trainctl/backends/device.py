"""Where a backend computes and in what precision, for every backend: the device of this rank,
the training dtype, the thread count, and the autocast context that goes with them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)  # one GPU per rank on a node
    if name != "auto":
        return torch.device(name)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


@dataclass(frozen=True, slots=True)
class Placement:
    """This rank's device and training dtype (from ``train.device``/``train.dtype``)."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, train: Any, local_rank: int) -> Placement:
        device = resolve_device(train.device, local_rank)
        return cls(device, resolve_dtype(train.dtype, device))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forwards; float32 runs without autocast's dispatch cost."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def synchronize(self) -> None:
        """Wait for the device (timing only: a host sync)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def set_rng_state(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @property
    def names(self) -> tuple[str, str]:
        """``("cuda:0", "bfloat16")``, for the plan."""
        return str(self.device), str(self.dtype).removeprefix("torch.")


def set_threads(threads: int) -> None:
    """``train.threads`` (0: leave torch's default)."""
    if threads:
        torch.set_num_threads(threads)
