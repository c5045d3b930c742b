"""One optimizer step, for every backend: the backend supplies a loss per micro-batch, this
module does the rest.

    zero_grad
    for each local micro-batch (DDP: no all-reduce but in the last one's backward):
        with autocast: share = loss(micro-batch)                 # the backend's
                       + sum(loss terms) / grad_accum            # plugins', on (B, T, V) logits
        backward(scaler.scale(share * world))                    # DDP/FSDP average over ranks
    unscale; grad norm of all gradients (global); clip to it
    finite = loss and norm finite (ranks: the reduced norm)      # on the device, no host sync
    optimizer step where finite, else a no-op (bit-identical)   # FiniteUpdate / GradScaler
    skip counters += on the device                               # read on logged steps only

A backend's ``loss`` returns each micro-batch's *share* of the step's loss: the shares of all
micro-batches of all ranks add up to the step's loss. ``gpt`` gives ``mean CE / grad_accum``;
``hf`` gives TRL's ``sum CE / trained tokens of the step`` (token-exact accumulation), so that
its losses stay bit-identical to ``SFTTrainer``'s. Where the model is spread over ranks is
``parallel.py``'s business, not this module's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainctl.backends import sharded_checkpoint
from trainctl.backends.device import Placement
from trainctl.backends.finite_update import FiniteUpdate
from trainctl.backends.parallel import Placed
from trainctl.backends.rng import load_rng, save_rng
from trainctl.backends.sample_record import SampleRecord
from trainctl.kernel.backend import BackendContext, Distributed, StepOutput
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.safe_load import load_plain

OPTIMIZER = "optimizer.pt"


@dataclass(slots=True)
class MicroLoss:
    """What a backend's loss function returns for one micro-batch (tensors on the device)."""

    share: torch.Tensor  # 0-d: this micro-batch's share of the step's loss (see the module doc)
    ce: torch.Tensor | None = None  # 0-d: its mean cross-entropy, for loss terms
    logits: torch.Tensor | None = None  # (B, T, V), aligned with targets; only when terms are on
    targets: torch.Tensor | None = None  # (B, T), ignored positions negative
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # shares, added over micro-batches


#: ``loss(module, batch, logits) -> MicroLoss``: ``logits`` asks for ce/logits/targets (loss terms)
LossFn = Callable[[Any, Any, bool], MicroLoss]


def local_micro_batches(grad_accum: int, dist: Distributed) -> list[int]:
    """The micro-batches of a step this rank runs: numbered globally, every world-th one, so any
    number of ranks trains on the same batches as one process."""
    if grad_accum % dist.world_size:
        raise ConfigError(f"train.grad_accum {grad_accum} must be a multiple of the {dist.world_size} ranks")
    return list(range(dist.rank, grad_accum, dist.world_size))


class OptimizerStep:
    """The optimizer, grad scaler, skip counters and parallel placement of one backend's model."""

    def __init__(self, *, optimizer: Any, params: list[nn.Parameter], placement: Placement, parallel: Placed,
                 train: Any, dist: Distributed, seed: int, loss_terms: Callable | None = None) -> None:
        self.optimizer, self.params, self.placement, self.parallel = optimizer, params, placement, parallel
        self.grad_accum, self.grad_clip, self.world = train.grad_accum, train.grad_clip, dist.world_size
        self.rank, self.seed, self.loss_terms = dist.rank, seed, loss_terms
        # under FSDP, bf16 is its MixedPrecisionPolicy (weights cast once per all-gather), not autocast
        self.autocast = contextlib.nullcontext() if parallel.sharded else placement.autocast()
        self.scaler = torch.amp.GradScaler(placement.device.type, enabled=placement.dtype == torch.float16)
        self.update = FiniteUpdate(optimizer)  # a non-finite step changes nothing, no host sync
        zero = lambda: torch.zeros((), device=placement.device)  # noqa: E731
        self.skipped_updates, self.skip_streak, self.skip_streak_max = zero(), zero(), zero()
        first = optimizer.param_groups[0]
        self.lr = first["lr"] / first["lr_scale"]  # the schedule's value, until set_lr

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def run(self, batches: Sequence[Any], loss: LossFn, *, tokens: int, processed_tokens: int | None = None) -> StepOutput:
        """One optimizer step over this rank's micro-batches ``batches``. No host sync."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.placement.device)
        extras: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with self.parallel.accumulating(last=i == len(batches) - 1):
                with self.autocast:
                    share = self._share(loss(self.parallel.forward, batch, self.loss_terms is not None), extras, len(batches))
                # each rank's shares add up to its part of the step loss; DDP averages over ranks
                self.scaler.scale(share * self.world if self.world > 1 else share).backward()
            total += share.detach()
        # this rank's estimate of the step loss; the kernel averages over ranks
        loss_value = total * self.world if self.world > 1 else total
        self.scaler.unscale_(self.optimizer)  # no-op unless float16
        grad_norm = self.parallel.grad_norm(self.params)  # before clipping; also decides finiteness
        if self.grad_clip > 0:
            self.parallel.clip_(self.params, self.grad_clip, grad_norm)
        # bool, on the device. Distributed or sharded: decided from the reduced gradients alone,
        # which every rank shares (a non-finite loss on any rank makes them non-finite), so all
        # ranks agree; on the gradients' device (the CPU under FSDP's offload), like the update
        reduced = self.world > 1 or self.parallel.sharded
        finite = torch.isfinite(grad_norm) if reduced else torch.isfinite(total) & torch.isfinite(grad_norm)
        skip = (~finite).to(self.placement.device, non_blocking=True)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # float16: the scaler skips non-finite gradients itself
            self.scaler.update()
        else:
            self.update.step(finite)
        self.skip_streak.add_(1).mul_(skip)
        torch.maximum(self.skip_streak_max, self.skip_streak, out=self.skip_streak_max)
        self.skipped_updates.add_(skip)
        return StepOutput(
            loss=loss_value, grad_norm=grad_norm.to(self.placement.device, non_blocking=True), skipped=skip, skipped_updates=self.skipped_updates,
            skip_streak_max=self.skip_streak_max, tokens=tokens,
            processed_tokens=tokens if processed_tokens is None else processed_tokens, metrics=extras,
        )

    def _share(self, out: MicroLoss, extras: dict[str, torch.Tensor], local: int) -> torch.Tensor:
        share = out.share
        for name, value in out.metrics.items():
            extras[name] = extras.get(name, 0) + value.detach()
        if self.loss_terms is not None:
            for name, term in self.loss_terms(out.logits, out.targets, out.ce):
                share = share + term / self.grad_accum  # the mean over the step's micro-batches, all ranks
                extras[name] = extras.get(name, 0) + term.detach() / local
        return share

    def measure(self, batch: Any, loss: LossFn, *, steps: int, micro_batches: int) -> float:
        """Seconds per optimizer step from forward/backward of ``batch`` on the bare model (after
        one untimed warm-up), times ``micro_batches``; weights, optimizer and RNG untouched."""
        rng = self.placement.rng_state()
        elapsed = 0.0
        for i in range(steps + 1):
            started = time.perf_counter()
            with self.autocast:
                share = loss(self.parallel.model, batch, False).share
            share.backward()  # DDP: the bare model, no all-reduce in the estimate; FSDP: its gathers are in it
            self.placement.synchronize()
            if i:
                elapsed += time.perf_counter() - started
        self.optimizer.zero_grad(set_to_none=True)
        self.placement.set_rng_state(rng)
        return elapsed / max(steps, 1) * micro_batches

    # --- checkpoint -----------------------------------------------------------------------

    def save(self, directory: Path, model: nn.Module | None = None) -> bool:
        """Every rank its RNG (``rng-rank{N}.pt``). A sharded ``model`` (FSDP; default: the placed
        model): every rank its shard of the weights and optimizer (``sharded_checkpoint``); else
        rank 0 the optimizer and scaler, the same on every rank under DDP. True on the rank that
        writes the full weights."""
        model = model or self.parallel.model
        save_rng(directory, self.rank, self.placement.device)
        if sharded_checkpoint.is_sharded(model):
            sharded_checkpoint.save_sharded(directory, model, self.optimizer, self._extra())
            return False
        if self.rank != 0:
            return False
        sharded_checkpoint.save_torch({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()},
                                      directory / OPTIMIZER)
        return True

    def load(self, directory: Path, model: nn.Module | None = None) -> None:
        """Optimizer, scaler and this rank's RNG; from a sharded checkpoint the weights too
        (the backend loads a full checkpoint's weights itself). Either layout into either
        placement, on any number of ranks."""
        model = model or self.parallel.model
        if sharded_checkpoint.is_sharded_checkpoint(directory):
            extra = sharded_checkpoint.load_sharded(directory, model, self.optimizer, self._extra())
            if extra:
                self.scaler.load_state_dict(extra["scaler"])
        else:
            opt = load_plain(directory / OPTIMIZER, self.placement.device)
            if sharded_checkpoint.is_sharded(model):
                sharded_checkpoint.load_full_optimizer(model, self.optimizer, opt["optimizer"])
            else:
                self.optimizer.load_state_dict(opt["optimizer"])
            self.scaler.load_state_dict(opt["scaler"])
        load_rng(directory, self.rank, self.placement.device, self.seed)

    def _extra(self) -> dict[str, Any]:
        # the scaler holds state only for float16 (a disabled one's is empty, which DCP cannot place)
        return {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def close(self) -> None:
        self.parallel.close()


class StepBackend:
    """What every backend built on ``OptimizerStep`` shares: where it runs, the learning rate,
    and the release. A subclass builds ``self.stepper`` in ``setup`` and owns its model, data
    and loss."""

    stepper: OptimizerStep
    record: SampleRecord | None = None  # data.record_samples, where the backend's data has it

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx, self.train = ctx, ctx.train
        self.placement = Placement.of(ctx.train, ctx.dist.local_rank)
        self.device, self.dtype = self.placement.device, self.placement.dtype

    def set_lr(self, lr: float) -> None:
        self.stepper.set_lr(lr)

    def close(self) -> None:
        if self.record is not None:
            self.record.close()
        if hasattr(self, "stepper"):  # setup may have failed before it existed
            self.stepper.close()  # before the process group goes

