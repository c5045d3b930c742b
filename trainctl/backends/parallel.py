"""How the model is spread over the ranks: the one seam of the step machinery that knows.

Two placements with the same members: :class:`Replicated` (DDP; nothing at all for one process)
and :class:`Sharded` (FSDP2). ``forward`` is the module training forwards go through, ``model``
the one evaluation, measurement and generation use, ``accumulating`` holds the gradient
reduction back while micro-batches accumulate, ``grad_norm`` is the global norm of the reduced
gradients, ``clip_`` scales them to a norm, ``load_weights`` puts whole (unsharded) weights in
place (checkpoints themselves are ``sharded_checkpoint``'s), ``close`` releases. ``sharded`` says
whether every forward is a collective (then every rank must run the same forwards together).
Nothing else in ``backends/`` depends on how parameters are placed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainctl.kernel.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Sharding:
    """The ``[train]`` keys that say how to place the model (``StepConfig``'s)."""

    parallel: str = "ddp"  # ddp | fsdp
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    compile: bool = False

    @classmethod
    def of(cls, train: Any) -> Sharding:
        return cls(parallel=train.parallel, reshard_after_forward=train.fsdp_reshard_after_forward,
                   cpu_offload=train.cpu_offload, compile=train.compile)


class Replicated:
    """Every rank holds the whole model; DDP averages gradients over ranks in backward
    (bucketed, overlapping the backward pass). Evaluation, measurement and generation use the
    bare model (``model``) and never talk to the other ranks."""

    sharded = False

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

    def load_weights(self, module: nn.Module, weights: dict, *, strict: bool = True) -> Any:
        return module.load_state_dict(weights, strict=strict)

    def close(self) -> None:
        # DDP's reducer must go before the process group does, or its C++ threads may abort the
        # process at exit
        self.forward = self.model
        self.ddp = None


class Sharded:
    """FSDP2 (``fully_shard``): each rank keeps 1/world of every parameter, gradient and
    optimizer state (DTensors sharded on dim 0). Each transformer block is one unit, then the
    root (embeddings, head, final norm): a block's weights are all-gathered just before its
    forward (and again in backward when ``reshard_after_forward``), its gradients
    reduce-scattered (averaged) right after its backward.

    Every forward is a collective: evaluation, measurement and generation run ``model`` on
    every rank, on the same batches, in lockstep. With one process this is a group of one."""

    sharded = True

    def __init__(self, model: nn.Module, *, device: torch.device, blocks: Iterable[nn.Module], sharding: Sharding,
                 param_dtype: torch.dtype | None) -> None:
        import torch.distributed as td
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        self.own_group = not td.is_initialized()
        if self.own_group:  # one process: a group of one, in memory (no network, no launcher)
            td.init_process_group("nccl" if device.type == "cuda" else "gloo", store=td.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh(device.type, (td.get_world_size(),))
        # bf16: weights all-gathered and computed in bf16, gradients reduced in fp32, the sharded
        # master weights and optimizer state stay fp32 (torchtitan's default); no autocast
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if sharding.cpu_offload else OffloadPolicy()
        self.options = options = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
        for block in blocks:
            if sharding.compile:
                block.compile()  # per block, before sharding, as torchtitan does: FSDP's hooks stay outside the graph
            fully_shard(block, reshard_after_forward=sharding.reshard_after_forward, **options)
        # the root's weights are needed again at once when backward starts: kept unsharded after
        # forward unless the user asked for the least memory
        fully_shard(model, reshard_after_forward=None if sharding.reshard_after_forward else False, **options)
        self.model = self.forward = model

    def shard_frozen(self, model: nn.Module, blocks: Iterable[nn.Module]) -> None:
        """A frozen model run beside the trained one (DPO's reference) sharded as it is: each rank
        keeps 1/world of its weights, and each block is gathered for its forward only."""
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block, reshard_after_forward=True, **self.options)
        fully_shard(model, reshard_after_forward=True, **self.options)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduce-scattered after every micro-batch and accumulate sharded: holding
        the reduction back (``set_requires_gradient_sync(False)``) would keep every unit's whole
        gradient on every rank, the memory FSDP exists to save (torchtitan does the same)."""
        return contextlib.nullcontext()

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The global 2-norm: each rank's shard norms, all-reduced (a DTensor's ``full_tensor``),
        as torchtitan's ``clip_grad_norm_`` does. Every rank gets the same value."""
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def clip_(self, params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)

    def load_weights(self, module: nn.Module, weights: dict, *, strict: bool = True) -> Any:
        """Whole weights, read by every rank; each keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        return set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=strict))

    def close(self) -> None:
        if self.own_group:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
            self.own_group = False


Placed = Replicated | Sharded


def for_run(model: nn.Module, *, device: torch.device, world_size: int, sharding: Sharding = Sharding(),
            blocks: Iterable[nn.Module] = (), dtype: torch.dtype = torch.float32) -> Placed:
    """The placement of ``model`` for this run: ``train.parallel``. ``blocks`` are the units FSDP
    shards one by one (the transformer blocks); ``dtype`` the training dtype."""
    if sharding.parallel == "ddp":
        return Replicated(model, device=device, world_size=world_size, compile=sharding.compile)
    if dtype == torch.float16:
        raise ConfigError("train.dtype = 'float16' is not supported with train.parallel = 'fsdp' (it needs a sharded "
                          "grad scaler); use train.dtype = 'bfloat16' or 'float32'")
    return Sharded(model, device=device, blocks=blocks, sharding=sharding,
                   param_dtype=dtype if dtype != torch.float32 else None)


def describe(train: Any, world_size: int, dtype: torch.dtype) -> str:
    """The plan's ``parallel`` line: ``one process``, ``ddp over 2 ranks`` or ``fsdp over 2 ranks
    (reshard after forward, bf16 weights / fp32 reduce)``."""
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    checkpointing = ["activation checkpointing"] if train.activation_checkpointing else []
    if train.parallel == "ddp":
        return (f"ddp over {ranks}" if world_size > 1 else "one process") + "".join(f" ({e})" for e in checkpointing)
    extras = ["reshard after forward" if train.fsdp_reshard_after_forward else "no reshard after forward"]
    if dtype == torch.bfloat16:
        extras.append("bf16 weights / fp32 reduce")
    if train.cpu_offload:
        extras.append("CPU offload")
    return f"fsdp over {ranks} ({', '.join(extras + checkpointing)})"
