"""``trainctl rollout-worker``: a process that generates a GRPO run's batches for its trainer
(``[hf.grpo] rollout_workers``), built from the run's own config (``grpo_worker.py``).

Every usage error (the config, the address, a port taken) is one line and exit code 2, before
the model loads where it can be; the socket is bound before the model loads, so a trainer's
request waits in its queue rather than being refused while the worker starts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from trainctl.cli.options import backend_option, config_argument, set_option
from trainctl.kernel.errors import ConfigError


def register(cli: click.Group) -> None:
    cli.add_command(rollout_worker)


@click.command(name="rollout-worker")
@config_argument
@backend_option
@set_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to bind (no authentication).")
@click.option("--port", required=True, type=click.IntRange(0, 65535), help="Port (0 = any free port: printed).")
@click.option("--weights", "weights", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The trainer's weights folder: its run directory's rollout-weights.")
def rollout_worker(config: str | None, backend: str | None, overrides: tuple[str, ...], host: str, port: int,
                   weights: Path) -> None:
    """Generate GRPO batches for a trainer whose hf.grpo.rollout_workers names this host:port."""
    from trainctl.cli.eval_worker import bind, is_loopback
    from trainctl.kernel import config as cfg
    from trainctl.kernel.registry import Registry

    if not is_loopback(host):
        raise ConfigError(f"--host {host} is not a loopback address: the rollout worker has no authentication; "
                          "bind 127.0.0.1 and reach it through an SSH tunnel")
    registry = Registry.discover()
    resolved = cfg.load(config, registry, overrides=list(overrides), backend=backend)
    hf = resolved.sections.get("hf")
    if resolved.backend != "hf" or hf is None or hf.objective != "grpo":
        raise ConfigError('rollout-worker generates for hf.objective = "grpo" runs; give the trainer\'s config '
                          "(with --backend hf if the config does not say it)")
    try:
        weights.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--weights {weights}: cannot create it ({exc.strerror}); give the trainer's "
                          "OUT/rollout-weights") from None
    sock = bind(host, port)

    from trainctl.backends.hf.grpo_backend import GRPOBackend  # imports torch: after the usage checks
    from trainctl.backends.hf.grpo_worker import RolloutWorker, serve
    from trainctl.kernel.backend import BackendContext

    with tempfile.TemporaryDirectory(prefix="trainctl-rollout-worker-") as scratch:
        rewards = reward_plugins(resolved, registry, Path(scratch))
        backend_ = GRPOBackend(BackendContext.of(resolved, out_dir=Path(scratch), rewards=rewards))
        worker = RolloutWorker(backend_.generator_side(), hf.grpo, weights.resolve())
        bound_host, bound_port = sock.getsockname()[:2]
        click.echo(f"rollout-worker: listening on http://{bound_host}:{bound_port} | weights {weights} | "
                   f"{resolved.model.name_or_path}, max staleness {hf.grpo.max_staleness}")
        try:
            serve(worker, sock)
        except KeyboardInterrupt:
            pass


def reward_plugins(resolved: Any, registry: Any, scratch: Path) -> dict[str, Any]:
    """The enabled plugins that ``hf.grpo.rewards`` names, each asked for its ``trainctl_reward``
    as the trainer asks it. Only those are built (a worker runs no logger, server or checkpoint
    of the run), with the worker's own run facts; their other hooks are never called here."""
    from trainctl.backends.hf import rewards as builtin
    from trainctl.hooks.plugin import RunInfo
    from trainctl.kernel.bus import EventBus
    from trainctl.kernel.registry import new_plugin_manager

    named = [name for name in resolved.plugins if name in resolved.sections["hf"].grpo.rewards and name not in builtin.BUILTIN]
    bus = EventBus(new_plugin_manager())
    info = RunInfo(run_name="rollout-worker", backend=resolved.backend, out_dir=scratch, max_steps=resolved.train.max_steps)
    for name in reversed(named):  # pluggy calls the last registered first, as the trainer registers
        spec = registry.plugin(name)
        bus.register(spec, spec.factory(resolved.plugin[name], info))
    return bus.reward_plugins()

