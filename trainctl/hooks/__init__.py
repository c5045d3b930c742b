"""Writing a trainctl plugin.

A plugin is a small object whose methods are marked ``@hookimpl``; the hooks it may implement,
when each fires and how results combine are all in :mod:`trainctl.hooks.spec`. Built-in plugins
are written exactly like yours. A complete one::

    import time
    from dataclasses import dataclass
    from trainctl.hooks import Every, NoticeKind, PluginSpec, RunInfo, hookimpl
    from trainctl.hooks.events import Control, Notice, RunView, StepEnd

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config:                      # mirrors the [plugin.stop_at_loss] table
        target: float = 1.5
        report_every: int = 100        # 0: only at the last step

    REACHED = NoticeKind(name="stop_at_loss.reached", sender="stop_at_loss",
                         when="the logged loss fell below the target", data={"loss": "float: that loss"})

    class StopAtLoss:
        def __init__(self, config: Config, run: RunInfo) -> None:
            self.config, self.run, self.hit = config, run, False
            self.report = Every(config.report_every)   # every N steps and at the last one

        @hookimpl
        def trainctl_step_end(self, event: StepEnd) -> None:
            # the loss is measured only on logged steps (no host sync otherwise)
            if event.loss is not None and event.loss < self.config.target and not self.hit:
                self.hit = True
                self.run.emit(Notice(step=event.step, kind=REACHED.name, data={"loss": event.loss},
                                     time=time.time()))
            if self.report.due(event.step, event.max_steps):
                print(f"step {event.step}: target {'reached' if self.hit else 'not reached'}")

        @hookimpl
        def trainctl_control(self, view: RunView) -> Control | None:
            return Control(stop=True, reason="target loss") if self.hit else None

    @hookimpl
    def trainctl_register_plugins(register):
        register(PluginSpec(name="stop_at_loss", factory=StopAtLoss, config=Config, notices=(REACHED,),
                            description="Stop once the training loss is below a target."))

Make the module available through the ``trainctl.plugins`` entry-point group::

    [project.entry-points."trainctl.plugins"]
    stop_at_loss = "my_package.stop_at_loss"

and enable it in a config (``plugins = ["lr", "stop_at_loss", "console"]``, options in
``[plugin.stop_at_loss]``). Being installed makes a plugin available; only the list enables it.

Rules of the road:

- **The spec is the contract.** When a run starts, every ``@hookimpl`` of your plugin is checked
  against :mod:`trainctl.hooks.spec`: a hook the spec does not have (``trainctl_step_ended``) or
  an argument it does not name is a config error (exit 2) naming your plugin and the closest real
  hook. Mark a hook ``@hookimpl(optionalhook=True)`` only to support a newer trainctl's hook.
- **Order.** Hooks run in the order of the ``plugins`` list. Put loggers last, after anything
  that decides. ``tryfirst``/``trylast`` move one implementation to the front or the back.
- **Decisions are return values.** Never reach into the kernel to stop or save: return a
  :class:`~trainctl.hooks.events.Control` from ``trainctl_control``; the kernel combines all
  answers (any stop wins). ``firstresult`` hooks (the learning rate, writing and finding
  checkpoints) take the first non-None answer in list order, as their spec says. Hook wrappers
  (``wrapper=True``/``hookwrapper=True``) are refused: a wrapper could rewrite the answers of
  the other plugins, which would make the outcome depend on who wraps whom.
- **Cadence.** "Every N steps and at the end" is ``Every(n).due(step, max_steps)``
  (:mod:`trainctl.hooks.cadence`; ``Every(n, at_end=False)`` without the last step, ``n = 0``
  only at the end). For the end of a run stopped early, act on ``trainctl_control`` with
  ``view.state == "ending"``.
- **Events are plain data**: frozen dataclasses of scalars, safe to keep or send elsewhere.
- **Tensors reach two hooks only**, both on the device and never to be read there:
  ``trainctl_loss_terms`` (training micro-batches) and ``trainctl_eval_metrics`` (evaluation
  batches: answer ``{name: (total, count)}``, summed by the kernel over the split, reported as
  ``total / count`` in the eval event's ``metrics``; ``trainctl.plugins.topk_accuracy`` is one).
- **Rewards** for online RL (``[hf] objective = "grpo"``) are ``trainctl_reward(prompts,
  completions, rows)``: one float per completion. A reward plugin is enabled in ``plugins`` and
  named in ``hf.grpo.rewards``; it is asked alone, and its failure ends the run in one line
  naming it (it is the training signal, not an observer whose errors can be skipped).
- **Emitting.** ``run.emit(event)`` queues an event (e.g. a ``Notice``); the kernel delivers it
  on the training thread at the next step boundary, so it is safe to call from any thread.
- **Notices are a declared vocabulary** (:mod:`trainctl.hooks.notices`): match on the constants
  there (``event.kind == notices.SAVING``), and declare the kinds your plugin sends with
  ``PluginSpec(notices=(NoticeKind(...),))``, naming them ``"<plugin>.<what>"``. Sending a kind
  nobody declared raises ``UndeclaredNotice`` in ``run.emit``: one line naming the kind.
- **Failures.** A plugin registered with ``critical=True`` that raises fails the run. Any other
  plugin is an observer: its error is reported once with its name, and after
  ``train.plugin_max_failures`` failures it is disabled while the run goes on. A
  ``trainctl.kernel.errors.ConfigError`` (bad input) always ends the run with exit 2.
- **State** that must survive a resume goes through ``trainctl_state_dict`` /
  ``trainctl_load_state_dict``, as plain JSON values: what ``state_dict`` returns, loaded into a
  fresh instance, must give the same ``state_dict`` back (``tests/test_plugin_contract.py``
  checks this, with surviving every event in every run state, for every built-in plugin).
- **Cost.** ``trainctl_step_end`` and ``trainctl_control`` run every step: do nothing heavy
  there, and never read device values. ``TRAINCTL_TRACE_HOOKS=1`` prints every hook call with
  its arguments, the plugins that answer it (in call order) and the result.
"""

from trainctl.hooks.cadence import Every
from trainctl.hooks.notices import NoticeKind
from trainctl.hooks.plugin import BackendSpec, NoConfig, PluginSpec, RunInfo
from trainctl.hooks.spec import hookimpl, hookspec

__all__ = ["BackendSpec", "Every", "NoConfig", "NoticeKind", "PluginSpec", "RunInfo", "hookimpl", "hookspec"]
