"""The memory plan: what one rank will hold at its peak, worked out from the config alone, before
anything is allocated, and compared with what the device has.

A backend describes its model as a :class:`ModelShape` (parameter counts and saved activation
bytes, from its config; ``gpt/memory.py``, ``hf/memory.py``); :func:`estimate` turns a shape,
the optimizer and the parallel strategy into per-rank :class:`Term` s:

    parameters        fp32 master weights          DDP: all; FSDP: 1/world + the blocks gathered
                                                   (two, and the root: embeddings, head, final norm)
    gradients         fp32, trained params only    DDP: + its bucket copy; FSDP: 1/world + one
                                                   block's and the root's unsharded
    optimizer state   AdamW 2 x fp32, Muon 1 x fp32 for hidden matrices (AdamW for the rest);
                      FSDP: 1/world
    activations       saved for backward at the micro-batch (B x T tokens) on every layer, or only
                      each block's input with activation checkpointing, plus one layer's working set
    logits            the loss's (B, T, V) fp32 tensors and their gradient
    frozen model      a second model run without gradients (DPO's or GRPO's reference copy); FSDP: 1/world
    reward model      GRPO's reward model (hf.grpo.reward_model): its weights, never trained
    generation cache  GRPO's KV cache while the policy generates a generation batch (no gradients)

``cpu_offload`` moves parameters, gradients and optimizer state to host memory (a CUDA device
then keeps only the blocks being computed). On a CPU device host and device are the same RAM.

How close it is: within ±35 % of the measured peak (``bench/memory_plan.py``,
``tests/test_memory_plan.py``). So a run is refused only when it *clearly* does not fit: when
even the estimate less that uncertainty (``total / 1.35``) is more than the memory available.
Between that and the estimate itself the plan says the run is tight, and trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

UNCERTAINTY = 0.35  # the estimate is within ±35 % of the measured peak
#: a parameter count no machine can hold (~4 PiB of fp32): refused even with the check off,
#: because building it would hang in allocation instead of answering
MAX_PARAMS = 2**50
FP32 = 4
#: What a training process holds beyond the model's tensors, per rank. CPU, measured here
#: (bench/memory_plan.py, a 2-layer 32-wide GPT): ~96 MiB, most of it torch's kernels paged in on
#: first use (fused AdamW's first step alone ~73 MiB) and the decoded embedded corpus. CUDA:
#: cuBLAS workspaces and the caching allocator's slack, a round figure (not measured here).
RUNTIME = {"cpu": 96 * 2**20, "cuda": 512 * 2**20}


@dataclass(frozen=True, kw_only=True, slots=True)
class Term:
    """One part of a rank's peak memory."""

    name: str  # parameters | gradients | optimizer state | activations | logits
    bytes: int
    what: str  # how the error line names it: "activations at block_size 100000 x batch 12"
    fix: str  # what lowers it, in config keys
    host: bool = False  # in host memory (cpu_offload) rather than on the device


@dataclass(frozen=True, kw_only=True, slots=True)
class Strategy:
    """How the model is spread over the ranks (``train.parallel`` and its options)."""

    parallel: str = "ddp"  # ddp | fsdp
    world_size: int = 1
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True

    @classmethod
    def of(cls, train: Any, world_size: int) -> Strategy:
        """From a ``StepConfig`` (or ``TrainConfig``)."""
        return cls(parallel=train.parallel, world_size=world_size, cpu_offload=train.cpu_offload,
                   activation_checkpointing=train.activation_checkpointing,
                   reshard_after_forward=train.fsdp_reshard_after_forward)

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelShape:
    """What a backend's config says about the memory its model needs (counts and bytes)."""

    params: int  # every parameter
    trained: int  # parameters with gradients (LoRA: the adapters)
    hidden_matrices: int  # trained 2-D hidden weights: Muon's share of ``trained``
    block_params: int  # parameters of one transformer block (FSDP's unit of gathering)
    layers: int
    tokens: int  # per micro-batch: batch x sequence
    saved_per_token_layer: int  # bytes kept for backward per token per layer, no checkpointing
    checkpointed_per_token_layer: int  # bytes kept per token per layer with checkpointing (the input)
    attention_per_layer: int = 0  # bytes per layer beyond the per-token ones: a materialised (B, nh, T, T)
    other_saved_per_token: int = 0  # embeddings and final norm, once per token
    logits: int = 0  # bytes of the loss's vocabulary-sized tensors and their gradient
    what_activations: str  # "block_size 100000 x batch 12"
    fix_activations: str  # the keys that shrink them
    checkpointing_key: str  # the key that turns activation checkpointing on
    model_fix: str = "a smaller model"
    pipeline: int = 0  # host bytes of the backend's data pipeline and libraries beyond torch's
    frozen: int = 0  # parameters of a frozen model run beside the trained one (DPO's reference copy)
    what_frozen: str = ""  # how the error line names it
    fix_frozen: str = ""  # what removes it, in config keys
    scorer: int = 0  # parameters of a reward model scoring completions (GRPO), held whole on every rank
    what_scorer: str = ""
    cache: int = 0  # bytes of a generation's KV cache (GRPO's in-process rollouts)
    what_cache: str = ""
    fix_cache: str = ""


def estimate(shape: ModelShape, *, optimizer: str, strategy: Strategy, device: str,
             param_bytes: int = FP32) -> MemoryEstimate:
    """The per-rank terms of ``shape`` trained with ``optimizer`` under ``strategy``."""
    world = strategy.world_size
    share = world if strategy.sharded else 1
    offload = strategy.cpu_offload and not device.startswith("cpu")
    # optimizer state per trained parameter: Muon keeps one momentum for hidden matrices, AdamW two
    # moments for everything (else)
    muon = shape.hidden_matrices if optimizer == "muon" else 0
    # gradients and optimizer state take the parameters' dtype (fp32 but for hf's bf16/fp16 loads)
    state = (2 * (shape.trained - muon) + muon) * param_bytes
    params = shape.params * param_bytes // share
    grads = shape.trained * param_bytes // share
    device_params = device_grads = 0
    if strategy.sharded:
        # gathered while computing: two blocks (the current one and the prefetched next) when
        # resharding after forward, else every block from forward to backward; the root unit
        # (embeddings, head, final norm: GPT-2 small's largest) is kept gathered from forward to
        # backward either way. One block's unsharded gradients wait for their reduce-scatter,
        # and at the end of backward the root's (trained in a full fine-tune)
        root = max(shape.params - shape.layers * shape.block_params, 0)
        gathered = (2 * shape.block_params + root if strategy.reshard_after_forward
                    else shape.params - shape.params // world)
        device_params = gathered * param_bytes
        full_training = shape.trained == shape.params
        device_grads = (shape.block_params + (root if full_training else 0)) * param_bytes if shape.trained else 0
    elif world > 1:
        grads *= 2  # DDP's buckets are a second copy of every gradient
    sharding = 'shard over more ranks (train.parallel = "fsdp")' if not strategy.sharded else "shard over more ranks"
    state_fix = f"{sharding}, train.cpu_offload = true, optim.name = \"muon\" or {shape.model_fix}"
    model_fix = f"{sharding}, train.cpu_offload = true or {shape.model_fix}"
    terms = [
        Term(name="parameters", bytes=params, what=f"{shape.params:,} parameters", fix=model_fix, host=offload),
        Term(name="gradients", bytes=grads, what=f"gradients of {shape.trained:,} parameters", fix=model_fix, host=offload),
        Term(name="optimizer state", bytes=state // share, what=f"{optimizer} state of {shape.trained:,} parameters",
             fix=state_fix, host=offload),
    ]
    if device_params or device_grads:
        gather_fix = shape.model_fix if strategy.reshard_after_forward else "train.fsdp_reshard_after_forward = true"
        terms.append(Term(name="gathered blocks", bytes=device_params + device_grads,
                          what="blocks gathered by FSDP", fix=gather_fix))
    if shape.frozen:  # sharded as the trained model is under FSDP
        terms.append(Term(name="frozen model", bytes=shape.frozen * param_bytes // share, what=shape.what_frozen,
                          fix=shape.fix_frozen, host=offload))
    if shape.scorer:
        terms.append(Term(name="reward model", bytes=shape.scorer * param_bytes, what=shape.what_scorer,
                          fix="a smaller reward model", host=offload))
    if shape.cache:
        terms.append(Term(name="generation cache", bytes=shape.cache, what=shape.what_cache, fix=shape.fix_cache))
    terms += [
        Term(name="activations", bytes=activations(shape, strategy.activation_checkpointing),
             what=f"activations at {shape.what_activations}", fix=_activation_fix(shape, strategy)),
        Term(name="logits", bytes=shape.logits, what=f"logits at {shape.what_activations}", fix=shape.fix_activations),
        Term(name="runtime", bytes=RUNTIME.get(device.partition(":")[0], 0), what="the runtime (torch's kernels, buffers)",
             fix="close other programs"),
        Term(name="data pipeline", bytes=shape.pipeline, what="the data pipeline", fix="close other programs", host=True),
    ]
    checkpointing = strategy.activation_checkpointing
    return MemoryEstimate(terms=tuple(terms), device=device, world_size=world, params=shape.params,
                          model_fix=shape.model_fix, checkpointing=checkpointing,
                          other_activations=activations(shape, not checkpointing))


def activations(shape: ModelShape, checkpointing: bool) -> int:
    """Bytes saved for backward at the micro-batch, plus one layer's working set (the layer being
    recomputed under checkpointing; the gradients flowing through it in backward otherwise)."""
    layer = shape.tokens * shape.saved_per_token_layer
    kept = shape.tokens * shape.checkpointed_per_token_layer if checkpointing else layer + shape.attention_per_layer
    return shape.layers * kept + layer + shape.attention_per_layer * checkpointing + shape.tokens * shape.other_saved_per_token


def _activation_fix(shape: ModelShape, strategy: Strategy) -> str:
    if strategy.activation_checkpointing:
        return shape.fix_activations
    return f"{shape.fix_activations}, or turn on {shape.checkpointing_key}"


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    """One rank's estimated peak, by term, and the memory it is compared with."""

    terms: tuple[Term, ...]
    device: str  # cpu | cuda:N | mps
    world_size: int = 1
    params: int = 0  # every parameter of the model
    model_fix: str = "a smaller model"
    checkpointing: bool = False  # the activations term is with activation checkpointing
    other_activations: int = 0  # the activations the other way (with checkpointing if off, without if on)
    available: int | None = None  # bytes free on the device (CPU: MemAvailable); None: unknown
    host_available: int | None = None  # host RAM, when terms live there (cpu_offload)

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def on_device(self) -> int:
        """Bytes on the device (everything, when the device is the CPU)."""
        return sum(t.bytes for t in self.terms if not t.host or self.device.startswith("cpu"))

    def on_host(self) -> int:
        return 0 if self.device.startswith("cpu") else sum(t.bytes for t in self.terms if t.host)

    def biggest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    def fits(self, available: int | None = None) -> bool:
        """False only when it clearly does not: even the estimate less its uncertainty is more
        than ``available`` (default: what was read from the device)."""
        available = self.available if available is None else available
        clear = 1 + UNCERTAINTY
        device_ok = available is None or self.on_device() / clear <= available
        host_ok = self.host_available is None or self.on_host() / clear <= self.host_available
        return device_ok and host_ok

    def impossible(self) -> str | None:
        """Why no machine could build this model (refused even with the check off), or None."""
        if self.params <= MAX_PARAMS:
            return None
        return (f"the model would have {self.params:,} parameters (≈ {human_bytes(self.params * FP32)} of fp32 weights), "
                f"beyond what any machine can build; choose {self.model_fix}")

    def refusal(self) -> str:
        """The one line that says why the run does not fit and what to change."""
        host = not self.device.startswith("cpu") and self.host_available is not None \
            and self.on_host() / (1 + UNCERTAINTY) > self.host_available
        terms = [t for t in self.terms if t.host == host or self.device.startswith("cpu")]
        worst = max(terms, key=lambda t: t.bytes)
        need, have = (self.on_host(), self.host_available) if host else (self.on_device(), self.available)
        where = "host RAM" if host or self.device.startswith("cpu") else self.device
        return (f"this run needs ≈ {human_bytes(need)} per rank, more than the {human_bytes(have or 0)} {where} "
                f"available; the biggest part is {worst.what} ≈ {human_bytes(worst.bytes)}: {worst.fix}; "
                "train.memory_check = false skips this check")

    def line(self) -> str:
        """The plan's memory line."""
        def part(t: Term) -> str:
            where = " (host)" if t.host and not self.device.startswith("cpu") else ""
            if t.name == "activations":
                other = "without checkpointing" if self.checkpointing else "checkpointed"
                where += f" ({human_bytes(self.other_activations)} {other})"
            return f"{t.name} {human_bytes(t.bytes)}{where}"

        parts = ", ".join(part(t) for t in self.terms if t.bytes)
        have = "unknown" if self.available is None else human_bytes(self.available)
        tight = "" if self.available is None or self.on_device() <= self.available else " (tight: the estimate is over what is free)"
        return f"≈ {human_bytes(self.total)} per rank ({parts}) | {self.device} has {have} available{tight}"

    def with_available(self) -> MemoryEstimate:
        """This estimate with the memory free now on its device (and host, under offload)."""
        from dataclasses import replace

        host = None if self.device.startswith("cpu") or not self.on_host() else host_available()
        return replace(self, available=device_available(self.device), host_available=host)


def device_available(device: str) -> int | None:
    """Free bytes on ``device``: CUDA's free memory, else the host's available RAM."""
    if device.startswith("cuda"):
        import torch

        from trainctl.kernel.errors import ConfigError

        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ConfigError(f"train.device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              "usable by torch; set train.device = \"cpu\" or \"auto\"")
        return torch.cuda.mem_get_info(index)[0]
    available = host_available()
    if available is not None and device.startswith("cpu"):
        # the ranks of one machine share its RAM: each may count on its part of it
        available //= max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    return available


def host_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo (what can be allocated without swapping), else psutil's."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def human_bytes(n: float) -> str:
    """``1.9 TiB``: binary units, one decimal; PiB is the largest."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "PiB":
            break
    return f"{n:.1f} {unit}"
