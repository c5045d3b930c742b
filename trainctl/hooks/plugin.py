"""How a plugin or backend describes itself, and what a plugin is given when a run enables it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainctl.hooks.notices import NoticeKind


@dataclass(frozen=True, kw_only=True, slots=True)
class NoConfig:
    """The config of a plugin that takes no options (an empty ``[plugin.NAME]`` table)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunInfo:
    """Facts about the run a plugin may need; never the whole config."""

    run_name: str
    backend: str
    out_dir: Path
    max_steps: int
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    #: Queue an event (any payload of ``trainctl.hooks.events``) for delivery on the training
    #: thread at the next step boundary (from ``trainctl_run_end``: at once, to the plugins
    #: whose run_end has not run yet). Safe from any thread.
    emit: Callable[[Any], None] = lambda event: None
    #: ``generate(prompt, max_new_tokens=..., temperature=..., top_k=..., seed=...) -> str``
    #: through the run's backend; available from ``trainctl_run_start`` on. Call it on every rank
    #: at the same point (under ``train.parallel = "fsdp"`` each forward is a collective).
    generate: Callable[..., str] = field(default=None, repr=False)  # type: ignore[assignment]
    #: ``layer_stats() -> {name: value}``: per-layer weight/gradient norms after the last step;
    #: like ``generate``, on every rank at the same point (the norms are global).
    layer_stats: Callable[[], dict[str, float]] = field(default=None, repr=False)  # type: ignore[assignment]
    #: The ranks' collectives (:class:`trainctl.kernel.distributed.Group`: ``broadcast``,
    #: ``gather``, ``all_ok``) for a plugin whose hook must act together on every rank (the
    #: checkpoint plugin). Every rank must make the same calls in the same order. None in tests.
    group: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's shared files (logs, status, ledger); the others only compute."""
        return self.rank == 0


@dataclass(frozen=True, kw_only=True, slots=True)
class PluginSpec:
    """A plugin made *available* by ``trainctl_register_plugins``; a config enables it by name.

    ``factory(config, run)`` builds the object whose ``@hookimpl`` methods join the run. ``config``
    is the plugin's frozen dataclass: the kernel builds it from ``[plugin.NAME]`` (unknown keys and
    wrong types are config errors; ``__post_init__`` may raise ``ValueError`` for bad values).
    A ``critical`` plugin that raises ends the run as failed; any other plugin is an observer:
    its errors are reported and, after ``train.plugin_max_failures``, it is disabled.
    ``notices`` declares the notice kinds the plugin sends beyond the built-in ones
    (:mod:`trainctl.hooks.notices`); the bus refuses a kind that no one declared.
    """

    name: str
    factory: Callable[[Any, RunInfo], object]
    config: type = NoConfig
    description: str = ""
    critical: bool = False
    notices: tuple[NoticeKind, ...] = ()
    source: str = "builtin"  # filled in by the registry: builtin or the distribution's name


@dataclass(frozen=True, kw_only=True, slots=True)
class BackendSpec:
    """A backend made available by ``trainctl_register_backends``.

    ``factory`` is ``"module:attr"`` so that listing backends never imports torch or
    transformers; ``model_config`` and ``data_config`` validate the ``[model]`` and ``[data]``
    tables (they must live in modules that import neither).
    """

    name: str
    factory: str
    model_config: type
    data_config: type
    description: str = ""
    source: str = "builtin"
    extra: str = ""  # the pip extra that provides its dependencies, for error messages
    #: Further top-level tables this backend owns, e.g. ``{"hf": HFConfig}`` for ``[hf]``.
    sections: dict[str, type] = field(default_factory=dict)
    #: ``"module:function"``, a ``MemoryEstimator`` (``trainctl.kernel.backend``): the memory plan
    #: from the config alone, checked before ``setup``; "" = no plan, no check.
    memory: str = ""
