"""Writing a trainctl plugin.

A plugin is a small object whose methods are marked ``@hookimpl``; the hooks it may implement,
when each fires and how results combine are all in :mod:`trainctl.hooks.spec`. Built-in plugins
are written exactly like yours. A complete one::

    from dataclasses import dataclass
    from trainctl.hooks import PluginSpec, RunInfo, hookimpl
    from trainctl.hooks.events import Control, RunView, StepEnd

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:                      # mirrors the [plugin.stop_at_loss] table
        target: float = 1.5

    class StopAtLoss:
        def __init__(self, config: Config, run: RunInfo) -> None:
            self.config, self.hit = config, False

        @hookimpl
        def trainctl_step_end(self, event: StepEnd) -> None:
            # the loss is measured only on logged steps (no host sync otherwise)
            if event.loss is not None and event.loss < self.config.target:
                self.hit = True

        @hookimpl
        def trainctl_control(self, view: RunView) -> Control | None:
            return Control(stop=True, reason="target loss") if self.hit else None

    @hookimpl
    def trainctl_register_plugins(register):
        register(PluginSpec(name="stop_at_loss", factory=StopAtLoss, config=Config,
                            description="Stop once the training loss is below a target."))

Make the module available through the ``trainctl.plugins`` entry-point group::

    [project.entry-points."trainctl.plugins"]
    stop_at_loss = "my_package.stop_at_loss"

and enable it in a config (``plugins = ["lr", "stop_at_loss", "console"]``, options in
``[plugin.stop_at_loss]``). Being installed makes a plugin available; only the list enables it.

Rules of the road:

- **Order.** Hooks run in the order of the ``plugins`` list. Put loggers last, after anything
  that decides.
- **Decisions are return values.** Never reach into the kernel to stop or save: return a
  :class:`~trainctl.hooks.events.Control` from ``trainctl_control``; the kernel combines all
  answers (any stop wins). The learning rate is a first-result hook.
- **Events are plain data**: frozen dataclasses of scalars, safe to keep or send elsewhere.
- **Emitting.** ``run.emit(event)`` queues an event (e.g. a ``Notice``); the kernel delivers it
  on the training thread at the next step boundary, so it is safe to call from any thread.
- **Failures.** A plugin registered with ``critical=True`` that raises fails the run. Any other
  plugin is an observer: its error is reported once with its name, and after
  ``train.plugin_max_failures`` failures it is disabled while the run goes on.
- **State** that must survive a resume goes through ``trainctl_state_dict`` /
  ``trainctl_load_state_dict``.
- **Cost.** ``trainctl_step_end`` and ``trainctl_control`` run every step: do nothing heavy
  there, and never read device values. Set ``TRAINCTL_TRACE_HOOKS=1`` to see every hook call.
"""

from trainctl.hooks.cadence import Every
from trainctl.hooks.notices import NoticeKind
from trainctl.hooks.plugin import BackendSpec, NoConfig, PluginSpec, RunInfo
from trainctl.hooks.spec import hookimpl, hookspec

__all__ = ["BackendSpec", "Every", "NoConfig", "NoticeKind", "PluginSpec", "RunInfo", "hookimpl", "hookspec"]
