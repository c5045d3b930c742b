"""The backend contract: what the kernel asks of ``gpt``, ``hf`` or any other backend.

The kernel owns the loop, its cadence and every decision; a backend owns the math of one step
and everything that lives on the device. It never decides when to evaluate, save or stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the kernel's contract is importable without torch (``trainctl --help``)
    from torch import Tensor

    from trainctl.kernel.config import RunConfig
    from trainctl.kernel.schema import OptimConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class Distributed:
    """Where this process sits among the ranks (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class StepConfig:
    """The keys of ``[train]`` a backend uses: the shape of a step and where it runs. Cadence,
    logging and control stay with the kernel."""

    max_steps: int
    batch_size: int  # sequences per micro-batch, per rank
    grad_accum: int  # micro-batches per optimizer step, summed over all ranks
    eval_steps: int  # batches per split in an evaluation; 0 = the whole split
    grad_clip: float  # max gradient norm; 0 = off
    device: str  # auto | cpu | cuda | cuda:N | mps
    dtype: str  # auto | float32 | bfloat16 | float16
    compile: bool
    threads: int  # CPU threads for torch; 0 = one per physical core
    parallel: str = "ddp"  # ddp | fsdp: how the model is placed over the ranks
    fsdp_reshard_after_forward: bool = True
    cpu_offload: bool = False  # fsdp only
    activation_checkpointing: bool = False  # per transformer block
    eval_batch_size: int = 0  # rows per evaluation batch; 0 = batch_size
    eval_loss: str = "tokens"  # tokens | batches (transformers' Trainer's mean of batch means)

    @classmethod
    def of(cls, train: Any) -> StepConfig:
        """These keys of a ``TrainConfig``."""
        return cls(**{f.name: getattr(train, f.name) for f in fields(cls)})


@dataclass(frozen=True, kw_only=True, slots=True)
class BackendContext:
    """Everything a backend is built from: its own tables and nothing else."""

    model: Any  # the backend's [model] dataclass
    data: Any  # the backend's [data] dataclass
    train: StepConfig
    optim: OptimConfig
    sections: dict[str, Any]  # the backend's own extra tables, e.g. [hf]
    seed: int
    out_dir: Path
    dist: Distributed = Distributed()
    #: ``loss_terms(logits, targets, loss) -> [(name, term)]`` from plugins, or None when no
    #: plugin adds terms (then the backend must not spend anything on them). Called per training
    #: micro-batch with (B, T, V) logits, (B, T) targets and the micro-batch's mean cross-entropy.
    loss_terms: Callable[[Tensor, Tensor, Tensor], list[tuple[str, Tensor]]] | None = None
    #: ``eval_metrics(split, logits, targets) -> {name: (total, count)}`` from plugins
    #: (``trainctl_eval_metrics``), or None when no plugin computes any (then evaluation
    #: materialises no logits for them). Hand it to ``scoring.evaluate`` with each batch's
    #: (B, T, V) logits and aligned (B, T) targets in its ``BatchScore``.
    eval_metrics: Callable[[str, Tensor, Tensor], dict[str, tuple[Tensor, Tensor]]] | None = None
    #: built only to load a checkpoint and write it again or generate (``trainctl export``, and
    #: ``sample`` of a sharded checkpoint): it never trains or evaluates, so the backend skips its
    #: data checks and reads no more data than building the model needs
    load_only: bool = False
    #: ``{plugin: reward(prompts, completions, rows) -> one float per completion}``: the enabled
    #: plugins that implement ``trainctl_reward``, each asked alone; a rollout backend uses those
    #: its config names (``hf.grpo.rewards``)
    rewards: Mapping[str, Callable[[list[Any], list[Any], list[dict[str, Any]]], Any]] = field(default_factory=dict)
    #: False: built to load a checkpoint and evaluate or generate (``trainctl eval``, ``export``,
    #: ``sample``, the eval worker), never to train: nothing that only training calls is
    #: resolved, so no code a checkpoint's config names is imported (GRPO's reward functions)
    trains: bool = True

    @classmethod
    def of(cls, config: RunConfig, *, out_dir: Path, dist: Distributed = Distributed(),
           loss_terms: Callable[[Any, Any, Any], list[tuple[str, Any]]] | None = None,
           eval_metrics: Callable[[str, Any, Any], dict[str, tuple[Any, Any]]] | None = None,
           rewards: Mapping[str, Callable[[list[Any], list[Any], list[dict[str, Any]]], Any]] | None = None,
           load_only: bool = False, trains: bool = True) -> BackendContext:
        """The sections of a resolved config that a backend uses."""
        return cls(model=config.model, data=config.data, train=StepConfig.of(config.train), optim=config.optim,
                   sections=config.sections, seed=config.seed, out_dir=out_dir, dist=dist, loss_terms=loss_terms,
                   eval_metrics=eval_metrics, rewards=dict(rewards or {}), load_only=load_only, trains=trains)


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
    #: one rank's estimated peak memory (``trainctl.backends.memory.MemoryEstimate``), set by the
    #: kernel from the backend's ``MemoryEstimator`` before ``setup``; None: the backend has none
    memory: Any = None
    #: > 0: the run's length, derived by the backend from its data (hf: ``data.epochs``);
    #: it replaces ``train.max_steps`` before the first step
    max_steps: int = 0
    #: > 0: steps in one pass over the training data (a fraction when steps run over an epoch's
    #: end), for ``train.eval_strategy``/``save_strategy = "epoch"``; 0: the backend has no epochs
    #: (gpt streams tokens)
    steps_per_epoch: float = 0.0


@dataclass(kw_only=True, slots=True)
class StepOutput:
    """One step's results, still on the device: reading them is a host sync, so the kernel does
    it only on logged steps, all at once (one stacked read, averaged over ranks).

    ``trainctl.backends.step.OptimizerStep`` fills every field; a backend built without it
    must at least give ``loss`` and ``tokens``."""

    loss: Tensor  # 0-d: the step's training loss (mean over its micro-batches, loss terms included)
    grad_norm: Tensor | None = None  # 0-d: global gradient norm, before clipping
    skipped: Tensor | bool = False  # 0-d bool: the update was not applied (non-finite)
    skipped_updates: Tensor | None = None  # 0-d: updates skipped since the process started
    skip_streak_max: Tensor | None = None  # 0-d: the longest run of consecutive skipped updates
    tokens: int  # tokens trained in this step (scored by the loss), all ranks
    processed_tokens: int | None = None  # positions the model ran, padding included (None: = tokens)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # loss terms and backend extras only
    #: values an objective had to read to the host anyway (RL: rewards are scored on decoded
    #: text, TRL's KL and clip ratios are read per micro-batch), reported as they are on logged
    #: steps: no device read, and no float32 rounding of a float64 mean
    host_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Evaluation:
    """One split's evaluation: the loss (a cross-entropy unless ``cross_entropy`` is false, e.g.
    a DPO loss) and an accuracy (top-1 tokens; for DPO, the reward accuracy), averaged as
    ``loss_mean`` says (``train.eval_loss``)."""

    loss: float
    accuracy: float | None = None  # fraction of scored items (tokens, pairs) the model gets right
    tokens: int = 0  # items scored
    cross_entropy: bool = True  # the loss is a cross-entropy, so exp(loss) is a perplexity
    #: "tokens": means over every scored item; "batches": transformers' Trainer's eval_loss (each
    #: batch's mean, weighted by its rows) and TRL's eval accuracy (the mean of batch means)
    loss_mean: str = "tokens"
    metrics: dict[str, float] = field(default_factory=dict)  # the plugins' (trainctl_eval_metrics), by name

    @property
    def perplexity(self) -> float | None:
        """``exp(loss)`` of a cross-entropy (infinite rather than an OverflowError for a diverged
        model); None for any other loss, where it would mean nothing."""
        if not self.cross_entropy:
            return None
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @classmethod
    def of(cls, value: Evaluation | float) -> Evaluation:
        """A backend may answer a bare loss (the contract before accuracy was asked for)."""
        return value if isinstance(value, Evaluation) else cls(loss=float(value))


class MemoryEstimator(Protocol):
    """A backend's memory plan, registered as ``BackendSpec.memory`` (``"module:function"``).

    Called by the kernel with the backend's context *before* the backend is constructed or set
    up: it reads the config (and at most the model's config file or the data's metadata) and
    allocates nothing on the device, so a shape no machine could hold is answered in seconds.
    Returns a ``trainctl.backends.memory.MemoryEstimate`` of one rank's peak (parameters,
    gradients, optimizer state, activations at the micro-batch, logits); the kernel fills in
    the memory available, refuses the run when it clearly does not fit (``train.memory_check``)
    and puts it in ``Plan.memory``. Raises ConfigError for input it cannot read."""

    def __call__(self, ctx: BackendContext) -> Any: ...


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
        and optimizer state stay bit-identical) and ``skipped`` is true, decided on the device.
        ``skipped_updates``/``skip_streak_max`` are device counters for the ``loss_guard``
        plugin, which sees only logged steps. Loss terms (``BackendContext.loss_terms``) get each
        micro-batch's mean cross-entropy, its (B, T, V) logits and (B, T) targets (ignored
        positions negative). ``trainctl.backends.step.OptimizerStep`` does all of this given a
        loss per micro-batch: a backend built on it owns only its model, data and loss."""

    def evaluate(self, step: int) -> dict[str, Evaluation]:
        """Loss and token accuracy per split (``train``, ``val``) over ``train.eval_steps`` fixed
        batches of ``train.eval_batch_size`` rows, averaged as ``train.eval_loss`` says (and
        ``Evaluation.loss_mean`` tells), with loss terms off. Leaves training state alone:
        parameters, optimizer, RNG, and the model back in training mode."""

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
        """Seconds per step, estimated by timing forward/backward without updating anything:
        parameters, optimizer state and RNG are as they were."""

    def close(self) -> None:
        """Release resources (process groups, files)."""
