"""``python tests/fsdp_run.py ARGS`` = ``python -m trainctl ARGS`` with the model placed by FSDP2.

Test-only, until the strategy switch (``train.parallel = "fsdp"``, branch fsdp) is merged: it
replaces ``parallel.for_run`` with a minimal FSDP2 placement (``fully_shard`` on every
transformer block, then the root, over a mesh of all ranks), so that the checkpoint tests run the
real CLI under torchrun on a truly sharded model (DTensor parameters and optimizer state).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch import nn


class Sharded:
    """The members of ``parallel.Replicated`` that the step machinery uses, for FSDP2."""

    def __init__(self, model: nn.Module, *, device: torch.device, world_size: int, compile: bool = False) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = self.forward = model

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)  # reduce-scatter once, after the last micro-batch
        return contextlib.nullcontext()

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # the global norm of the shards

    def clip_(self, params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)

    def close(self) -> None:
        pass


def blocks(model: nn.Module) -> list[nn.Module]:
    """gpt: its blocks; hf: the modules named in ``_no_split_modules`` (the decoder layers)."""
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        return list(model.transformer.h)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def placed(model: nn.Module, **kw: Any) -> Sharded:
    return Sharded(model, **kw)


if __name__ == "__main__":
    from trainctl.backends import parallel
    from trainctl.cli import main

    parallel.for_run = placed
    args = sys.argv[1:]
    main(args[2:] if args[:2] == ["-m", "trainctl"] else args)  # LiveRun's launcher line ends in -m trainctl
