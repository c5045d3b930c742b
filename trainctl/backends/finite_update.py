"""Applying an optimizer update only when the step is finite, decided on the device (both
backends).

The kernel's contract: a non-finite loss or gradient norm leaves parameters and optimizer state
bit-identical, without a host sync. Fused AdamW does this natively: given ``found_inf`` (the
flag GradScaler uses), its kernel skips the update and undoes its step count. Optimizers
without that (Muon, unfused AdamW) get a snapshot of what the update touches, restored with
``torch.where`` where the step was not finite: one extra copy of their parameters and state per
step, the price of not syncing. Under FSDP2 parameters and state are DTensors: the snapshot and
the restore work on each rank's local shard (the decision ``finite`` is the same on every rank).
"""

from __future__ import annotations

from typing import Any

import torch

from trainctl.backends.optim import CombinedOptimizer


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard (a view: writing it writes ``t``)."""
    return t.to_local() if hasattr(t, "to_local") else t


def parts(optimizer: Any) -> list[torch.optim.Optimizer]:
    return [optimizer.adamw, optimizer.muon] if isinstance(optimizer, CombinedOptimizer) else [optimizer]


class FiniteUpdate:
    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.fused = [o for o in parts(optimizer) if o.defaults.get("fused")]
        self.guarded = [o for o in parts(optimizer) if not o.defaults.get("fused")]

    def step(self, finite: torch.Tensor) -> None:
        """``optimizer.step()`` where ``finite`` (a 0-d bool tensor) holds; a no-op elsewhere."""
        found_inf = (~finite).to(torch.float32)
        for o in self.fused:
            o.found_inf = found_inf  # read by the fused kernel; 1.0 = skip this update
        saved = [self._snapshot(o) for o in self.guarded]
        self.optimizer.step()
        for o, snapshot in zip(self.guarded, saved):
            self._restore(o, snapshot, finite)

    @staticmethod
    def _snapshot(o: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        out = []
        for group in o.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue  # untouched by step()
                state = {k: local(v).clone() for k, v in o.state[p].items() if torch.is_tensor(v)}
                out.append((p, local(p.detach()).clone(), state))
        return out

    @staticmethod
    @torch.no_grad()
    def _restore(o: torch.optim.Optimizer, snapshot: list, finite: torch.Tensor) -> None:
        for p, before, state_before in snapshot:
            mine = local(p)
            mine.copy_(torch.where(finite, mine, before))
            for k, v in o.state[p].items():
                if torch.is_tensor(v):
                    v = local(v)
                    # state created by this step starts from zeros, as a fresh optimizer's would
                    old = state_before.get(k, torch.zeros_like(v))
                    v.copy_(torch.where(finite, v, old))
