"""Console output through structlog: readable lines and a progress bar with ETA on a terminal,
JSON lines otherwise (CI, files, log collectors).

The ETA is the wall time per step between logged steps, less the evaluations, checkpoints and
pauses in between (so the work plugins do per step, such as samples, counts, and a pause or a
slow evaluation does not), times the steps left, plus the evaluations and interval checkpoints
still to come at their measured durations. While paused, the bar says so instead of counting
down.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import CheckpointSaved, EvalEnd, Notice, RunEnd, RunStart, StepEnd

BAR_WIDTH = 24
REDRAW_S = 0.1
#: Notices that only announce work about to start; the event that follows it is printed.
QUIET_NOTICES = frozenset({notices.EVALUATING, notices.SAVING})


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    format: Literal["auto", "pretty", "json"] = "auto"  # auto: pretty on a terminal
    progress: bool = True  # the progress bar (terminal only)


def human_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Console:
    def __init__(self, config: Config, run: RunInfo, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.enabled = run.is_main
        tty = self.stream.isatty()
        pretty = config.format == "pretty" or (config.format == "auto" and tty)
        self.bar = config.progress and tty
        import structlog  # here, not at import: listing plugins and --help stay fast

        renderer: Any = (
            structlog.dev.ConsoleRenderer(colors=tty, sort_keys=False, pad_event_to=9)  # step first, as emitted
            if pretty else structlog.processors.JSONRenderer()
        )
        processors = [structlog.processors.TimeStamper(fmt="%H:%M:%S" if pretty else "iso"), renderer]
        self.log = structlog.wrap_logger(structlog.PrintLogger(self.stream), processors=processors)
        self.max_steps = run.max_steps
        self.eval_s = 0.0  # duration of the last local evaluation
        self.eval_step: int | None = None
        self.eval_every: int | None = None  # observed steps between evaluations
        self.save_s = 0.0  # duration of the last interval checkpoint
        self.save_step: int | None = None
        self.save_every: int | None = None  # observed steps between interval checkpoints
        self.paused = False
        self.paused_s = 0.0  # total time paused, reported at the end
        self.step_time: float | None = None
        self.logged_at: tuple[int, float] | None = None  # (step, time) of the last logged step
        self.excluded = 0.0  # seconds of evaluation, saving and pause since then
        self.step = 0
        self.drawn = 0.0

    # --- ETA -------------------------------------------------------------------------------

    def eta(self) -> float | None:
        if self.step_time is None:
            return None
        remaining = self.max_steps - self.step
        evals_left = remaining // self.eval_every if self.eval_every else 0
        saves_left = remaining // self.save_every if self.save_every else 0
        return remaining * self.step_time + evals_left * self.eval_s + saves_left * self.save_s

    # --- output ----------------------------------------------------------------------------

    def _emit(self, message: str, /, **fields: Any) -> None:  # positional: a field may be called "message"
        if not self.enabled:
            return
        if self.bar and self.drawn:
            self.stream.write("\r\033[K")  # clear the bar; it is redrawn on the next step
            self.drawn = 0.0
        self.log.info(message, **{k: v for k, v in fields.items() if v is not None})

    def _draw_bar(self) -> None:
        now = time.monotonic()
        if now - self.drawn < REDRAW_S:
            return
        self.drawn = now
        frac = self.step / self.max_steps if self.max_steps else 1.0
        filled = int(frac * BAR_WIDTH)
        eta = self.eta()
        eta_text = " paused" if self.paused else f" eta {human_duration(eta)}" if eta is not None else ""
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(f"\r\033[K[{bar}] {self.step}/{self.max_steps} {frac:4.0%}{eta_text}")
        self.stream.flush()

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        self.step = event.start_step
        self.max_steps = event.max_steps  # the backend may have derived it (hf data.epochs)
        self._emit(
            "run start", run=event.run_name, backend=event.backend, params=f"{event.params / 1e6:.2f}M",
            tokens_per_step=event.tokens_per_step, steps=f"{event.start_step}->{event.max_steps}",
            out=event.out_dir, resumed_from=event.resumed_from,
        )

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        self.step = event.step
        if event.logged:
            # the kernel's mean over the interval: the steps alone, no hooks (events written by
            # hand may leave it out)
            mean = event.mean_step_time or event.step_time
            self.step_time = mean
            if self.logged_at is not None and event.step > self.logged_at[0]:
                wall = event.time - self.logged_at[1] - self.excluded
                self.step_time = max(wall / (event.step - self.logged_at[0]), mean)
            self.logged_at, self.excluded = (event.step, event.time), 0.0
            eta = self.eta()
            self._emit(
                "step", step=f"{event.step}/{event.max_steps}", loss=round(event.loss, 4),
                lr=f"{event.lr:.2e}", ms=round(mean * 1000, 1),
                tok_s=int(event.tokens_per_s or 0),
                mfu=f"{event.mfu:.1%}" if event.mfu is not None else None,
                grad_norm=round(event.grad_norm, 3) if event.grad_norm is not None else None,
                skipped=True if event.skipped else None,
                skipped_updates=event.skipped_updates or None,
                eta=human_duration(eta) if eta is not None else None,
                # zero terms would be noise on every line
                **{k: round(v, 5) for k, v in event.metrics.items() if v},
            )
        if self.bar and self.enabled:
            self._draw_bar()

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        if event.source == "local" and event.step != self.eval_step:
            if self.eval_step is not None:
                self.eval_every = event.step - self.eval_step
            self.eval_step, self.eval_s = event.step, event.duration
            self.excluded += event.duration  # one duration covers every split of an evaluation
        self._emit("eval", step=event.step, split=event.split, loss=round(event.loss, 4),
                   # which mean the loss is, when it is not the token mean (train.eval_loss = "batches": TRL's)
                   loss_mean=event.loss_mean if event.loss_mean != "tokens" else None,
                   source=event.source if event.source != "local" else None,
                   **{k: round(v, 4) for k, v in event.metrics.items() if k not in ("step", "split", "loss", "source")})

    @hookimpl
    def trainctl_checkpoint_saved(self, event: CheckpointSaved) -> None:
        if event.reason == "interval":
            if self.save_step is not None:
                self.save_every = event.step - self.save_step
            self.save_step, self.save_s = event.step, event.duration
        self.excluded += event.duration
        self._emit("save", step=event.step, path=event.path, reason=event.reason,
                   seconds=round(event.duration, 2))

    @hookimpl
    def trainctl_notice(self, event: Notice) -> None:
        if event.kind == notices.PAUSED:
            self.paused = True
        elif event.kind == notices.RESUMED:
            self.paused = False
            self.paused_s += float(event.data.get("paused_s", 0.0))
            self.excluded += float(event.data.get("paused_s", 0.0))
        if event.kind in QUIET_NOTICES:
            return
        if event.kind == notices.SAMPLES:
            for prompt, text in zip(event.data.get("prompts", []), event.data.get("texts", [])):
                self._emit("sample", step=event.step, prompt=prompt, text=text)
        else:
            self._emit(event.kind, step=event.step, message=event.message or None)
        if self.bar and self.enabled and event.kind in (notices.PAUSED, notices.RESUMED):
            self.drawn = 0.0
            self._draw_bar()

    @hookimpl
    def trainctl_run_end(self, event: RunEnd) -> None:
        self._emit(
            "run end", status=event.status, step=event.step, train_loss=_round(event.train_loss),
            val_loss=_round(event.val_loss), duration=human_duration(event.duration),
            paused=human_duration(self.paused_s) if self.paused_s else None, reason=event.reason or None,
        )
        if self.enabled:
            self.stream.flush()


def _round(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


SPEC = PluginSpec(name="console", factory=Console, config=Config,
                  description="Progress on the console (structlog): pretty with an ETA bar on a terminal, JSON otherwise.")
