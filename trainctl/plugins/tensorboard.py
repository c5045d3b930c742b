"""TensorBoard: scalars (training, evaluation, checkpoints, layer norms) and text (samples) in
``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``). A resumed run appends a new event
file to the same directory; TensorBoard shows them as one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import CheckpointSaved, EvalEnd, Notice, RunEnd, StepEnd
from trainctl.kernel.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    logdir: str = "tensorboard"  # relative to the run's out dir
    flush_s: int = 10  # the writer flushes at least this often (and at every evaluation and the end)

    def __post_init__(self) -> None:
        if self.flush_s < 1:
            raise ValueError("flush_s must be at least 1")


class TensorBoardLogger:
    def __init__(self, config: Config, run: RunInfo) -> None:
        try:
            import tensorboard  # noqa: F401  (torch's writer needs it; fail here, before training)
        except ImportError:
            raise ConfigError("plugin 'tensorboard' needs the tensorboard package: pip install 'trainctl[tensorboard]'") from None
        self.config, self.run = config, run
        self.enabled = run.is_main
        self.writer: Any = None

    def open(self) -> Any:
        """The writer, created at the first record (rank 0 only); None on other ranks."""
        if self.writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run.out_dir / self.config.logdir), flush_secs=self.config.flush_s)
        return self.writer

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        writer = self.open()
        if writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                writer.add_scalar(tag, value, step)

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        if event.logged:
            self.scalars({"train/loss": event.loss, "train/lr": event.lr, "train/grad_norm": event.grad_norm,
                          "train/tokens_per_s": event.tokens_per_s, "train/step_time_s": event.step_time,
                          "train/mfu": event.mfu, **{f"train/{k}": v for k, v in event.metrics.items()}}, event.step)

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        prefix = "eval" if event.source == "local" else f"eval_{event.source}"
        self.scalars({f"{prefix}/{event.split}_loss": event.loss}, event.step)
        if self.writer is not None:
            self.writer.flush()

    @hookimpl
    def trainctl_checkpoint_saved(self, event: CheckpointSaved) -> None:
        self.scalars({"checkpoint/save_s": event.duration}, event.step)

    @hookimpl
    def trainctl_notice(self, event: Notice) -> None:
        if event.kind == notices.LAYER_STATS:
            self.scalars({f"layers/{k}": v for k, v in event.data.items()}, event.step)
        elif event.kind == notices.SAMPLES and (writer := self.open()) is not None:
            for i, (prompt, text) in enumerate(zip(event.data["prompts"], event.data["texts"])):
                # markdown: a code block keeps newlines and spacing as generated
                writer.add_text(f"samples/{i}", f"```\n{prompt}{text}\n```", event.step)

    @hookimpl
    def trainctl_run_end(self, event: RunEnd) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


SPEC = PluginSpec(name="tensorboard", factory=TensorBoardLogger, config=Config,
                  description="TensorBoard scalars and text samples in OUT/tensorboard.")
