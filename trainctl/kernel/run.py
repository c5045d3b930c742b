"""Assembling a run from a resolved config: plugins, bus, backend, resume, and the loop.

Everything that can be wrong with the input is found here, before the first step, and raised
as a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainctl.hooks.plugin import RunInfo
from trainctl.kernel.backend import Backend, BackendContext, Distributed, Plan
from trainctl.kernel.bus import EventBus
from trainctl.kernel.config import RunConfig, dump_toml
from trainctl.kernel.distributed import Group
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.registry import Registry, load_factory, new_plugin_manager
from trainctl.kernel.safe_load import unpickling_reason
from trainctl.kernel.state import RunResult, RunState

KERNEL_FILE = "kernel.json"
PLUGINS_FILE = "plugins.json"
CONFIG_FILE = "config.toml"


def distributed_from_env() -> Distributed:
    """Rank facts set by torchrun / accelerate launch; one process when unset."""
    env = os.environ
    return Distributed(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
    )


class Run:
    """One training run, set up and ready to ``fit``."""

    def __init__(self, config: RunConfig, registry: Registry, *, resume: str = "auto", force: bool = False) -> None:
        self.config = config
        train = config.train
        self.out_dir = Path(train.out_dir)
        _check_writable(self.out_dir)
        dist = distributed_from_env()
        # joins the ranks' process group (WORLD_SIZE > 1) before anything that talks to it
        self.group = Group(dist, timeout_s=train.dist_timeout_s, device=train.device)
        pm = new_plugin_manager()
        critical = {name for name in config.plugins if registry.plugin(name).critical}
        self.bus = EventBus(pm, critical=critical, max_failures=train.plugin_max_failures)
        self.info = RunInfo(
            run_name=train.run_name or self.out_dir.resolve().name, backend=config.backend, out_dir=self.out_dir,
            max_steps=train.max_steps, rank=dist.rank, local_rank=dist.local_rank,
            world_size=dist.world_size, emit=self.bus.emit,
            generate=lambda prompt, **kw: self.backend.generate(prompt, **kw),
            layer_stats=lambda: self.backend.layer_stats(), group=self.group,
        )
        # pluggy calls the last registered first: register in reverse so list order is call order
        for name in reversed(config.plugins):
            spec = registry.plugin(name)
            pm.register(spec.factory(config.plugin[name], self.info), name=name)
        problems = self.bus.check_config(config.to_dict())
        if problems:
            raise ConfigError("; ".join(problems))

        backend_spec = registry.backend(config.backend)
        try:
            factory = load_factory(backend_spec.factory)
        except ImportError as exc:
            extra = f": pip install 'trainctl[{backend_spec.extra}]'" if backend_spec.extra else ""
            raise ConfigError(f"backend '{config.backend}' needs a package that is missing ({exc.name}){extra}") from None
        self.backend: Backend = factory(BackendContext(
            model=config.model, data=config.data, train=train, optim=config.optim,
            sections=config.sections, seed=config.seed, out_dir=self.out_dir, dist=dist,
            loss_terms=self.bus.loss_terms if self.bus.has_loss_terms() else None,
        ))
        self.plan: Plan = self.backend.setup()
        if self.plan.max_steps and self.plan.max_steps != self.config.train.max_steps:
            self._set_max_steps(self.plan.max_steps)
        self.state = RunState()
        self.resumed_from = self._resume(resume, force)

    def fit(self) -> RunResult:
        from trainctl.kernel.loop import Trainer

        trainer = Trainer(
            backend=self.backend, bus=self.bus, plan=self.plan, train=self.config.train,
            base_lr=self.config.optim.lr, run=self.info, state=self.state,
            write_state=self.write_state, resumed_from=self.resumed_from, group=self.group,
        )
        try:
            return trainer.fit()
        finally:
            self.close()

    def close(self) -> None:
        """Release the backend and leave the process group (every rank together)."""
        self.backend.close()
        self.group.close()

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
        kernel = {
            "format": 1,
            "run_name": self.info.run_name,
            "backend": self.config.backend,
            "state": state.to_dict(),
            "locked": self.config.locked(),
            "rng": {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())},
            "time": time.time(),
        }
        (directory / KERNEL_FILE).write_text(json.dumps(kernel, indent=1))
        (directory / PLUGINS_FILE).write_text(json.dumps(self.bus.state_dict(), indent=1))
        (directory / CONFIG_FILE).write_text(dump_toml(self.config.to_dict()))

    def _resume(self, resume: str, force: bool) -> str | None:
        path = self.bus.find_checkpoint(resume)
        found = self.group.gather(str(path) if path else None)
        if len(set(found)) > 1:  # e.g. a run directory not shared by every node
            raise ConfigError(
                f"the ranks found different checkpoints to resume from ({', '.join(map(str, found))}); "
                "put train.out_dir on storage every node sees, or pass --resume PATH"
            )
        if path is None:
            return None
        try:
            kernel = json.loads((path / KERNEL_FILE).read_text())
            plugins = json.loads((path / PLUGINS_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"checkpoint {path} is unreadable ({exc}); resume from another with --resume PATH or start over with --resume never") from None
        changed = [
            f"{key}: {kernel['locked'].get(key)!r} -> {value!r}"
            for key, value in self.config.locked().items()
            if _plain(kernel["locked"].get(key)) != _plain(value)
        ]
        if changed and not force:
            raise ConfigError(
                f"cannot resume from {path}: locked keys differ ({'; '.join(changed)}); "
                "restore them, start over with --resume never, or pass --force"
            )
        try:
            self.backend.load(path)
        except pickle.UnpicklingError as exc:  # a backend that let torch.load's refusal through
            raise ConfigError(
                f"refused to load checkpoint {path}: a file holds more than tensors and plain values "
                f"({unpickling_reason(exc)}); resume from another with --resume PATH"
            ) from None
        except (OSError, KeyError, RuntimeError, ValueError) as exc:  # e.g. --force over a changed shape
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
            what = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]  # "Error(s) in ...:" then the error
            raise ConfigError(
                f"cannot load checkpoint {path} into this run ({type(exc).__name__}: {what}); "
                "resume from another with --resume PATH or start over with --resume never"
            ) from None
        self.state.restore(kernel["state"])
        random.setstate(_tuples(kernel["rng"]["python"]))
        np.random.set_state(tuple(kernel["rng"]["numpy"]))
        self.bus.load_state_dict(plugins)
        return str(path)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"out dir {out_dir} is not writable ({exc.strerror}); choose another with --out DIR") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
