"""Assembling a run from a resolved config, top to bottom: the process group, the plugins on
their bus, the backend, then resume; ``fit`` hands them to the loop.

Everything that can be wrong with the input is found here, before the first step, and raised
as a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (here, not in the group's rendezvous: a resumed run's clock counts it as process start)

from trainctl.hooks.cadence import schedule
from trainctl.hooks.plugin import RunInfo
from trainctl.kernel import resume as resuming
from trainctl.kernel import run_dir
from trainctl.kernel.backend import Backend, BackendContext, Distributed, Plan
from trainctl.kernel.bus import EventBus
from trainctl.kernel.config import RunConfig
from trainctl.kernel.distributed import Group
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.recovery import Recovery
from trainctl.kernel.registry import Registry, load_factory, new_plugin_manager
from trainctl.kernel.resume import CONFIG_FILE, KERNEL_FILE, PLUGINS_FILE  # noqa: F401  (re-exported)
from trainctl.kernel.secrets import save_config
from trainctl.kernel.state import RunResult, RunState


def distributed_from_env() -> Distributed:
    """Rank facts set by torchrun / accelerate launch; one process when unset."""
    env = os.environ
    return Distributed(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
    )


class BackendCalls:
    """What plugins may ask of the backend (``RunInfo.generate``, ``RunInfo.layer_stats``).

    Plugins are built before the backend, because which of them add loss terms decides how the
    backend is built; so they get these calls through this object, which the run binds to the
    backend once it exists. A call before that (from a plugin's constructor) is an error."""

    def __init__(self) -> None:
        self._backend: Backend | None = None

    def bind(self, backend: Backend) -> None:
        self._backend = backend

    def generate(self, prompt: str, **options: Any) -> str:
        return self._bound().generate(prompt, **options)

    def layer_stats(self) -> dict[str, float]:
        return self._bound().layer_stats()

    def _bound(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("the backend does not exist yet: call RunInfo.generate/layer_stats from trainctl_run_start on")
        return self._backend


class Run:
    """One training run, set up and ready to ``fit``."""

    def __init__(self, config: RunConfig, registry: Registry, *, resume: str = "auto", force: bool = False) -> None:
        self.config = config
        self.out_dir = Path(config.train.out_dir)
        dist = distributed_from_env()
        self.run_dir = run_dir.claim(self.out_dir, main=dist.rank == 0, plugins=config.plugins)
        self.recovery = Recovery()  # a few clock reads: where a resumed run's start-up time went
        # joins the ranks' process group (WORLD_SIZE > 1) before anything that talks to it
        self.group = Group(dist, timeout_s=config.train.dist_timeout_s, device=config.train.device)
        self.recovery.rendezvous = time.time()
        calls = BackendCalls()
        self.bus, self.info = self._plugins(registry, dist, calls)
        memory = self._memory_plan(registry, dist)  # from the config alone: before anything is allocated
        self.backend = self._backend(registry, dist)
        calls.bind(self.backend)
        self.plan: Plan = dataclasses.replace(self.backend.setup(), memory=memory)
        if self.plan.max_steps and self.plan.max_steps != self.config.train.max_steps:
            self._set_max_steps(self.plan.max_steps)
        self._check_cadence()
        self.state = RunState()
        self.recovery.setup = time.time()
        self.resumed_from = self._resume(resume, force)
        if self.resumed_from:
            self.recovery.resumed(self.out_dir, Path(self.resumed_from))

    def fit(self) -> RunResult:
        from trainctl.kernel.loop import Trainer

        trainer = Trainer(
            backend=self.backend, bus=self.bus, plan=self.plan, train=self.config.train,
            base_lr=self.config.optim.lr, run=self.info, state=self.state,
            write_state=self.write_state, resumed_from=self.resumed_from, group=self.group,
            recovery=self.recovery if self.resumed_from else None,
        )
        try:
            return trainer.fit()
        finally:
            self.close()

    def close(self) -> None:
        """Release the backend and leave the process group (every rank together)."""
        self.backend.close()
        self.group.close()
        self.run_dir.release()

    # --- assembly, in order ------------------------------------------------------------------

    def _plugins(self, registry: Registry, dist: Distributed, calls: BackendCalls) -> tuple[EventBus, RunInfo]:
        """The enabled plugins, registered on a new bus, each given its own table and RunInfo."""
        config = self.config
        pm = new_plugin_manager()
        pm.register(self.run_dir, name="run_dir")  # the kernel's own: stops the run if its directory is deleted
        critical = {name for name in config.plugins if registry.plugin(name).critical}
        bus = EventBus(pm, critical=critical, max_failures=config.train.plugin_max_failures)
        info = RunInfo(
            run_name=config.train.run_name or self.out_dir.resolve().name, backend=config.backend,
            out_dir=self.out_dir, max_steps=config.train.max_steps, rank=dist.rank, local_rank=dist.local_rank,
            world_size=dist.world_size, emit=bus.emit, generate=calls.generate, layer_stats=calls.layer_stats,
            group=self.group,
        )
        # pluggy calls the last registered first: register in reverse so list order is call order
        for name in reversed(config.plugins):
            spec = registry.plugin(name)
            bus.register(spec, spec.factory(config.plugin[name], info))  # guarded, checked against the spec
        problems = bus.check_config(config.to_dict())
        if problems:
            raise ConfigError("; ".join(problems))
        return bus, info

    def _backend(self, registry: Registry, dist: Distributed) -> Backend:
        """The configured backend, given its own tables and the step keys of ``[train]``."""
        config = self.config
        spec = registry.backend(config.backend)
        try:
            factory = load_factory(spec.factory)
        except ImportError as exc:
            extra = f": pip install 'trainctl[{spec.extra}]'" if spec.extra else ""
            raise ConfigError(f"backend '{config.backend}' needs a package that is missing ({exc.name}){extra}") from None
        return factory(BackendContext.of(
            config, out_dir=self.out_dir, dist=dist,
            loss_terms=self.bus.loss_terms if self.bus.has_loss_terms() else None,
            eval_metrics=self.bus.eval_metrics if self.bus.has_eval_metrics() else None,
            rewards=self.bus.reward_plugins(),
        ))

    def _memory_plan(self, registry: Registry, dist: Distributed) -> Any:
        """The backend's memory estimate against the memory free now; a run that clearly does not
        fit is refused here (``train.memory_check``), before the model is built or measured."""
        spec = registry.backend(self.config.backend)
        if not spec.memory:
            return None
        try:
            estimator = load_factory(spec.memory)
        except ImportError as exc:
            extra = f": pip install 'trainctl[{spec.extra}]'" if spec.extra else ""
            raise ConfigError(f"backend '{self.config.backend}' needs a package that is missing ({exc.name}){extra}") from None
        estimate = estimator(BackendContext.of(self.config, out_dir=self.out_dir, dist=dist))
        problem = estimate.impossible()  # even with the check off: building it would never answer
        if problem:
            raise ConfigError(problem)
        estimate = estimate.with_available()
        refusal = estimate.refusal() if self.config.train.memory_check and not estimate.fits() else None
        # every rank refuses together (their free memory may differ), or none waits alone in setup
        refusal = next((r for r in self.group.gather(refusal) if r), None)
        if refusal:
            raise ConfigError(refusal)
        return estimate

    def _resume(self, resume: str, force: bool) -> str | None:
        """The checkpoint the plugins chose (the same on every rank), restored; None: fresh."""
        path = self.bus.find_checkpoint(resume)
        found = self.group.gather(str(path) if path else None)
        if len(set(found)) > 1:  # e.g. a run directory not shared by every node
            raise ConfigError(
                f"the ranks found different checkpoints to resume from ({', '.join(map(str, found))}); "
                "put train.out_dir on storage every node sees, or pass --resume PATH"
            )
        if path is None:
            return None
        resuming.resume(path=path, backend=self.backend, locked=self.config.locked(), force=force,
                        defaults=self.config.locked_defaults(),
                        restore_state=self.state.restore, load_plugins=self.bus.load_state_dict)
        return str(path)

    def _check_cadence(self) -> None:
        """``eval_strategy``/``save_strategy = "epoch"`` need a backend that counts epochs."""
        train = self.config.train
        for key, strategy in (("eval_strategy", train.eval_strategy), ("save_strategy", train.save_strategy)):
            if strategy == "epoch" and not self.plan.steps_per_epoch:
                interval = "eval_interval" if key == "eval_strategy" else "save_interval"
                raise ConfigError(f"train.{key} = 'epoch' needs a backend that counts epochs (hf); the "
                                  f"{self.config.backend} backend has none: use train.{interval} steps")

    def cadence_line(self) -> str:
        """The plan's line: when the run evaluates and saves."""
        train, per = self.config.train, self.plan.steps_per_epoch
        evaluate = schedule(train.eval_strategy, train.eval_interval, per).describe("evaluate")
        save = schedule(train.save_strategy, train.save_interval, per).describe("save")
        return f"{evaluate} (train.eval_strategy = {train.eval_strategy!r}); {save} (train.save_strategy = {train.save_strategy!r})"

    def _set_max_steps(self, steps: int) -> None:
        """The backend derived the run's length from its data (hf: ``data.epochs``): the loop, the
        saved config and every plugin's ``RunInfo`` see it from the first event on. RunInfo is
        frozen for the plugins; the kernel that made it sets this one field, before any event."""
        self.config = dataclasses.replace(self.config, train=dataclasses.replace(self.config.train, max_steps=steps))
        object.__setattr__(self.info, "max_steps", steps)

    # --- checkpoint contents owned by the kernel ---------------------------------------------

    def write_state(self, directory: Path, state: RunState) -> None:
        """Fill a checkpoint directory: the backend's files, then the kernel's and plugins'.
        Every rank calls this on the same directory; the backend writes what is its rank's
        (rank 0 the weights, each rank its RNG), the kernel's files come from rank 0."""
        self.backend.save(directory)
        if not self.info.is_main:
            return
        kernel = resuming.kernel_record(state=state.to_dict(), run_name=self.info.run_name,
                                        backend=self.config.backend, locked=self.config.locked())
        (directory / KERNEL_FILE).write_text(json.dumps(kernel, indent=1))
        (directory / PLUGINS_FILE).write_text(json.dumps(self.bus.state_dict(), indent=1))
        save_config(directory / CONFIG_FILE, self.config)  # secrets emptied, mode 0600


