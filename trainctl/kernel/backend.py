"""The backend contract: what the kernel asks of ``gpt``, ``hf`` or any other backend.

The kernel owns the loop, its cadence and every decision; a backend owns the math of one step
and everything that lives on the device. It never decides when to evaluate, save or stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True, kw_only=True, slots=True)
class Distributed:
    """Where this process sits among the ranks (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class BackendContext:
    """Everything a backend is built from: its own tables and nothing else."""

    model: Any  # the backend's [model] dataclass
    data: Any  # the backend's [data] dataclass
    train: Any  # trainctl.kernel.schema.TrainConfig
    optim: Any  # trainctl.kernel.schema.OptimConfig
    sections: dict[str, Any]  # the backend's own extra tables, e.g. [hf]
    seed: int
    out_dir: Path
    dist: Distributed = Distributed()
    #: ``loss_terms(logits, targets, loss) -> [(name, term)]`` from plugins, or None when no
    #: plugin adds terms (then the backend must not spend anything on them).
    loss_terms: Callable[[Any, Any, Any], list[tuple[str, Any]]] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What ``setup`` built, for the run-start event and the plan printed before training."""

    params: int  # trainable parameters
    total_params: int
    tokens_per_step: int  # global, all ranks and micro-batches
    flops_per_token: float | None = None  # for MFU; None when unknown
    peak_flops: float | None = None  # of the device, when known
    device: str = "cpu"
    dtype: str = "float32"
    summary: str = ""  # one line: the model and data
    details: dict[str, Any] = field(default_factory=dict)  # plain values shown in the plan
    #: > 0: the run's length, derived by the backend from its data (hf: ``data.epochs``);
    #: it replaces ``train.max_steps`` before the first step
    max_steps: int = 0


@dataclass(slots=True)
class StepOutput:
    """One step's results, still on the device: reading them is a host sync, so the kernel does
    it only on logged steps, all at once."""

    loss: Any  # scalar tensor: mean training loss over the step's micro-batches
    grad_norm: Any | None = None  # scalar tensor, before clipping
    tokens: int = 0  # tokens trained in this step, all ranks
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> scalar tensor (loss terms, ...)
    skipped: Any = False  # bool or bool tensor: the update was not applied


class Backend(Protocol):
    def setup(self) -> Plan:
        """Load data, build the model and optimizer on the device. Raise ConfigError for bad input
        (missing data, block size larger than the data, vocabulary mismatch)."""

    def set_lr(self, lr: float) -> None:
        """Use ``lr`` for the next update (scaled per parameter group as the backend needs)."""

    def train_step(self, step: int) -> StepOutput:
        """Run one optimizer step (all micro-batches: forward, backward, clip, update) on the
        batches that belong to ``step``. Must not sync with the host.

        If the loss or the gradient norm is not finite, the update is not applied (parameters
        and optimizer state stay bit-identical) and ``skipped`` is true; decide this on the
        device where it can avoid a sync. For the ``loss_guard`` plugin, which sees only logged
        steps, also report two device counters in ``metrics``: ``skipped_updates`` (skipped
        since the process started) and ``skip_streak_max`` (the longest run of consecutive
        skips)."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Mean loss per split (``train``, ``val``) over ``train.eval_steps`` batches, with loss
        terms off and the model back in training mode afterwards."""

    def save(self, directory: Path) -> None:
        """Write weights (safetensors), optimizer and RNG state into ``directory``: the torch RNG
        of each rank in its own file (``rng-rank{N}.pt``), and the data position if the step
        alone does not give it. The checkpoint plugin then hashes, fsyncs and renames."""

    def load(self, directory: Path) -> None:
        """Restore everything ``save`` wrote, so the next step is the one that would have run.
        Uses ``torch.load(weights_only=True)`` only; a file it refuses is a ConfigError naming
        the file (never fall back to an unsafe load)."""

    def generate(self, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
        """Text generated after ``prompt`` without disturbing training RNG state."""

    def layer_stats(self) -> dict[str, float]:
        """Per-layer weight and gradient norms after the last step (``"layer.N.weight_norm"``,
        ``"layer.N.grad_norm"``, plus ``"embedding.*"``/``"head.*"``). Reads the device: call it only
        on the steps that asked for it."""

    def measure(self, steps: int) -> float:
        """Seconds per step, estimated by timing forward/backward without updating anything."""

    def close(self) -> None:
        """Release resources (process groups, files)."""
