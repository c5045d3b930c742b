"""How the model is spread over the ranks: the one seam of the step machinery that knows.

Today that is replication (DDP; nothing at all for one process). Sharding (FSDP2) plugs in here
as another class with the same members: ``forward`` (the module training forwards go through),
``model`` (the bare one), ``accumulating`` (hold the gradient reduction back while micro-batches
accumulate), ``grad_norm`` (the global norm of the reduced gradients), ``clip_`` and ``close``. Nothing else in
``backends/`` depends on how parameters are placed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class Replicated:
    """Every rank holds the whole model; DDP averages gradients over ranks in backward
    (bucketed, overlapping the backward pass). Evaluation, measurement and generation use the
    bare model (``model``) and never talk to the other ranks."""

    def __init__(self, model: nn.Module, *, device: torch.device, world_size: int, compile: bool = False) -> None:
        self.model = torch.compile(model) if compile else model
        self.forward: Any = self.model
        self.ddp: Any = None
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.forward = torch.compile(ddp) if compile else ddp
            self.ddp = ddp

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Under DDP, the all-reduce runs once, in the backward of the last local micro-batch."""
        return contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The 2-norm of all gradients: after DDP's all-reduce every rank holds them all."""
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)

    def clip_(self, params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
        """Scale the gradients so that their global norm ``norm`` is at most ``max_norm``."""
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)

    def close(self) -> None:
        # DDP's reducer must go before the process group does, or its C++ threads may abort the
        # process at exit
        self.forward = self.model
        self.ddp = None


def for_run(model: nn.Module, *, device: torch.device, world_size: int, compile: bool = False) -> Replicated:
    """The placement of ``model`` for this run (the choice a sharding config will make)."""
    return Replicated(model, device=device, world_size=world_size, compile=compile)
