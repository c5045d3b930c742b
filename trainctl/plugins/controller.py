"""Steering a live run: signals and ``trainctl ctl`` commands, turned into ``Control`` decisions.

Signals (handlers installed when the run starts, restored when it ends, chained to any Python
handler that was there before):

- SIGTERM or SIGINT: finish the current step, save a checkpoint (reason ``signal``), end
  ``stopped``. Nothing is cut short: an evaluation or save in progress completes first.
- a second SIGINT: abort at once (``KeyboardInterrupt``). A checkpoint being written is removed
  (the checkpoint plugin writes into a temporary directory), so none is ever left half-written.
- SIGUSR1: save a checkpoint now (reason ``signal``) and go on.
- ``requeue_signal`` (off by default; ``"SIGUSR1"`` in ``configs/slurm/``, for SLURM's
  ``--signal=USR1@90`` warning): finish the current step, save a checkpoint and end ``stopped``
  with the reason ``requeued``; at run end rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (when
  set) and every rank exits 75 (:mod:`trainctl.control.requeue`). A save in progress completes
  first, an asynchronous one included. Under SLURM, SIGTERM is ignored from then on: the requeue
  sends it to every task, and the run is already ending.

Commands (``trainctl ctl RUN_DIR stop|pause|resume|save|eval``, see
:mod:`trainctl.control.channel`): read once per step (and every poll while paused), answered at
once with an acknowledgement file and a ``control`` notice, then again when a save or evaluation
is done. ``pause`` keeps the process and model in memory: the kernel polls the plugins (metrics
and status keep being served) until ``resume`` or ``stop``.

Only rank 0 reads commands (the kernel holds the run directory's lock, with or without this
plugin); the kernel agrees on rank 0's decision so that every rank stops, saves and pauses
together. A command file that cannot be answered (its name is not ``cmd-<id>.json`` with a
valid id) is removed and reported once as a ``control`` notice; one that cannot be read (a FIFO,
a symlink, too large, not JSON) is answered ``rejected``; neither stops the others of the batch.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from trainctl.control import channel, requeue
from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import CheckpointSaved, Control, EvalEnd, Notice, RunEnd, RunStart, RunView

STOP_SIGNALS = ("SIGTERM", "SIGINT")
SAVE_SIGNALS = ("SIGUSR1",)
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    signals: bool = True  # handle SIGTERM, SIGINT and SIGUSR1
    commands: bool = True  # accept `trainctl ctl` commands through OUT/control/
    requeue_signal: str = ""  # this signal saves, stops and requeues the SLURM job ("" = none)

    def __post_init__(self) -> None:
        if self.requeue_signal and self.requeue_signal not in REQUEUE_SIGNALS:
            close = difflib.get_close_matches(self.requeue_signal.upper(), REQUEUE_SIGNALS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"requeue_signal must be one of {', '.join(map(repr, REQUEUE_SIGNALS))} or \"\" "
                             f"(none), not {self.requeue_signal!r}{hint}")
        if self.requeue_signal and not self.signals:
            raise ValueError("requeue_signal needs signals = true")


class Controller:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config, self.run = config, run
        self.directory = channel.control_dir(run.out_dir)
        self.stop_signal: str | None = None  # set by a signal handler
        self.requeue = False  # set by the handler of config.requeue_signal
        self.save_signals = self.save_signals_seen = 0  # a counter: a signal is never lost to a reset
        self.stop_request = False
        self.paused = False
        self.save_request = self.eval_request = False
        self.waiting: dict[str, tuple[str, int]] = {}  # command id -> ("save" | "eval", step asked)
        self.step = 0  # the latest step seen, for notices sent from signal handlers
        self.last_eval: tuple[int, dict[str, float]] = (-1, {})
        self.previous: dict[int, Any] = {}
        self.channel_broken = False
        self.commands = run.is_main and config.commands  # the kernel made control/ and holds its lock
        self.ignored: set[str] = set()  # command files already reported as unanswerable

    # --- signals ------------------------------------------------------------------------------

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        if not self.config.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            self._notice(event.start_step, "signals not handled: the run is not on the main thread")
            return
        requeue_signal = (self.config.requeue_signal,) if self.config.requeue_signal else ()
        for name in dict.fromkeys(STOP_SIGNALS + SAVE_SIGNALS + requeue_signal):
            if hasattr(signal, name):
                signum = getattr(signal, name)
                self.previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == self.config.requeue_signal:
            self.requeue = True
            self.stop_signal = self.stop_signal or name
            self._notice(self.step, f"{name}: finishing this step, saving and exiting to be requeued", signal=name)
        elif name in SAVE_SIGNALS:
            self.save_signals += 1
            self._notice(self.step, f"{name}: saving a checkpoint after this step", signal=name)
        elif name == "SIGINT" and self.stop_signal is not None:
            print("trainctl: second interrupt: aborting now", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        else:
            if self.stop_signal is None:  # at once, for the person who pressed Ctrl-C
                print(f"trainctl: {name}: stopping after this step and saving (Ctrl-C again aborts)", file=sys.stderr, flush=True)
            self.stop_signal = self.stop_signal or name
            self._notice(self.step, f"{name}: finishing this step, saving and stopping (Ctrl-C again aborts)", signal=name)
        previous = self.previous.get(signum)
        # chain to a Python handler that was there, but not to the default SIGINT handler,
        # whose KeyboardInterrupt would abort the very save this handler asks for
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def _restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self.previous.clear()

    # --- decisions ----------------------------------------------------------------------------

    @hookimpl
    def trainctl_control(self, view: RunView) -> Control | None:
        self.step = view.step
        if self.commands:
            try:
                for received in channel.take(self.directory):  # one scandir; the dir is usually empty
                    self._receive(received, view)
                self._finish_evals()
            except OSError as exc:  # commands fail, but signals must keep working: never raise here
                self._broken(view.step, exc)
        signals = self.save_signals
        save_signal, self.save_signals_seen = signals != self.save_signals_seen, signals
        control = Control(
            stop=self.stop_signal is not None or self.stop_request,
            save=save_signal or self.save_request,
            evaluate=self.eval_request,
            pause=self.paused,
            reason=requeue.REQUEUED if self.requeue else "signal" if self.stop_signal or save_signal else "request",
        )
        self.save_request = self.eval_request = False
        return control if (control.stop or control.save or control.evaluate or control.pause) else None

    def _broken(self, step: int, exc: OSError) -> None:
        if not self.channel_broken:
            self.channel_broken = True
            self._notice(step, f"control channel unusable ({exc}); signals still work")

    def _receive(self, received: channel.Received, view: RunView) -> None:
        """One command file; whatever is wrong with it, the next one is still read."""
        if received.ident is None:
            if received.name not in self.ignored:
                self.ignored.add(received.name)
                self._notice(view.step, f"ignored control file {received.name[:80]!r}: not cmd-<id>.json with an id "
                             "of 1-64 letters, digits, '-' or '_' (use trainctl ctl)", file=received.name[:80])
            return
        try:
            if received.command is None:
                self._ack(received.ident, None, view, status="rejected",
                          message=f"unreadable command file {received.name}: {received.problem}")
            else:
                self._command(received.ident, received.command, view)
        except OSError as exc:  # the answer could not be written: the command itself still counts
            self._broken(view.step, exc)

    def _command(self, ident: str, command: dict[str, Any], view: RunView) -> None:
        name = command.get("command")
        if name not in channel.COMMANDS:
            self._ack(ident, name, view, status="rejected", message=f"unknown command {name!r}; use one of {', '.join(channel.COMMANDS)}")
            return
        message = {
            "stop": "stopping: saving a checkpoint, then exiting",
            "pause": f"pausing (the process stays alive; resume with: trainctl ctl {self.run.out_dir} resume)",
            "resume": "resuming" if self.paused else "not paused; nothing to resume",
            "save": "saving a checkpoint",
            "eval": "evaluating",
        }[name]
        if name == "stop":
            self.stop_request = True
        elif name == "pause":
            self.paused = True
        elif name == "resume":
            self.paused = False
        elif name == "save":
            self.save_request = True
            self.waiting[ident] = ("save", view.step)
        elif name == "eval":
            self.waiting[ident] = ("eval", view.step)
            if view.evaluated:  # already evaluated at this step: answer with those losses
                message = "evaluated already at this step"
            else:
                self.eval_request = True
        self._ack(ident, name, view, status="accepted", message=message)
        self._notice(view.step, f"{name}: {message}", command=name, id=ident)

    def _ack(self, ident: str, name: Any, view: RunView, **answer: Any) -> None:
        channel.acknowledge(self.directory, ident, {"command": name, "step": view.step, "state": view.state, **answer})

    # --- completion of save and eval commands ------------------------------------------------

    @hookimpl
    def trainctl_checkpoint_saved(self, event: CheckpointSaved) -> None:
        for ident, (kind, _) in list(self.waiting.items()):
            if kind == "save":
                del self.waiting[ident]
                channel.acknowledge(self.directory, ident, {
                    "command": "save", "status": "done", "step": event.step, "path": event.path,
                    "message": f"saved {event.path} at step {event.step}",
                })

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        if event.source == "local":
            step, losses = self.last_eval
            self.last_eval = (event.step, (losses if step == event.step else {}) | {event.split: event.loss})

    def _finish_evals(self) -> None:
        # called on the next decision after an evaluation: every split has reported by then
        step, losses = self.last_eval
        if not losses:
            return
        for ident, (kind, asked) in list(self.waiting.items()):
            if kind == "eval" and step >= asked:
                del self.waiting[ident]
                shown = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
                channel.acknowledge(self.directory, ident, {
                    "command": "eval", "status": "done", "step": step, "losses": losses,
                    "message": f"step {step}: {shown}",
                })

    @hookimpl
    def trainctl_run_end(self, event: RunEnd) -> None:
        self._restore()
        if event.status == "stopped" and requeue.requeued(event.reason):
            self._requeue(event.step)
        if not self.commands:
            return
        self._finish_evals()
        for ident, (kind, _) in self.waiting.items():
            channel.acknowledge(self.directory, ident, {
                "command": kind, "status": "ended", "step": event.step,
                "message": f"the run ended ({event.status}) before the {kind} was done",
            })
        self.waiting.clear()

    def _requeue(self, step: int) -> None:
        """The run stopped for a requeue (on any rank: the reason is agreed) with its checkpoint
        committed. Rank 0 asks SLURM; every rank then exits requeue.EXIT_REQUEUE (the CLI)."""
        if os.environ.get("SLURM_JOB_ID"):  # SLURM's requeue ends every task with SIGTERM: finish instead
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (SIGKILL follows after KillWait)
        if not self.run.is_main:
            return
        done, said = requeue.requeue_job(os.environ)
        if not done:
            print(f"trainctl: {said}", file=sys.stderr, flush=True)
        self._notice(step, said, signal=self.config.requeue_signal)

    def _notice(self, step: int, message: str, **data: Any) -> None:
        self.run.emit(Notice(step=step, kind=notices.CONTROL, message=message, data=data, time=time.time()))


SPEC = PluginSpec(name="controller", factory=Controller, config=Config,
                  description="Signals (SIGTERM/SIGINT: save and stop; SIGUSR1: save; requeue_signal: save, stop, "
                              "scontrol requeue) and `trainctl ctl` stop/pause/resume/save/eval.")
