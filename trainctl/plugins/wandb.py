"""Weights & Biases: scalars, evaluations, samples (as a table) and layer norms, logged against
the step. ``WANDB_MODE=offline`` (or ``mode = "offline"``) works without a network; sync later
with ``wandb sync OUT/wandb/offline-run-*``.

Everything wandb writes stays under the run directory: the run itself goes to ``OUT/wandb``
(``dir=``), and wandb's cache, data and config directories default to ``OUT/wandb/...`` too
(unless ``WANDB_CACHE_DIR`` etc. are already set) instead of the home directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import CheckpointSaved, EvalEnd, Notice, RunEnd, RunStart, StepEnd
from trainctl.kernel.errors import ConfigError

# wandb's own directories, kept inside the run instead of ~/.cache, ~/.local/share, ~/.config
HOME_DIRS = {"WANDB_CACHE_DIR": "cache", "WANDB_DATA_DIR": "data", "WANDB_CONFIG_DIR": "config",
             "WANDB_ARTIFACT_DIR": "artifacts"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    project: str = "trainctl"
    name: str = ""  # default: the run name
    tags: list[str] = field(default_factory=list)
    entity: str = ""  # default: your wandb default entity
    mode: Literal["", "online", "offline", "disabled"] = ""  # "": WANDB_MODE, else online


class WandbLogger:
    def __init__(self, config: Config, run: RunInfo) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("plugin 'wandb' needs the wandb package: pip install 'trainctl[wandb]'") from None
        self.wandb, self.config, self.run = wandb, config, run
        self.enabled = run.is_main
        self.session: Any = None
        self.run_id: str | None = None  # kept in the checkpoint: a resumed run continues the same wandb run

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        if not self.enabled:
            return
        c, root = self.config, self.run.out_dir / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        for var, sub in HOME_DIRS.items():
            os.environ.setdefault(var, str(root / sub))
        self.session = self.wandb.init(
            project=c.project, name=c.name or event.run_name, tags=list(c.tags), entity=c.entity or None,
            mode=c.mode or None, dir=str(self.run.out_dir), id=self.run_id, resume="allow" if self.run_id else None,
            config={"backend": event.backend, "params": event.params, "max_steps": event.max_steps,
                    "tokens_per_step": event.tokens_per_step, "world_size": event.world_size},
            settings=self.wandb.Settings(console="off", silent=True),
        )
        self.run_id = self.session.id

    @hookimpl
    def trainctl_state_dict(self) -> dict[str, Any]:
        return {"wandb": {"id": self.run_id}}

    @hookimpl
    def trainctl_load_state_dict(self, states: dict[str, Any]) -> None:
        self.run_id = states.get("wandb", {}).get("id")

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.session is not None:
            self.session.log(values, step=step)

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        if not event.logged:
            return
        values = {"train/loss": event.loss, "train/lr": event.lr, "train/grad_norm": event.grad_norm,
                  "train/tokens_per_s": event.tokens_per_s, "train/step_time": event.step_time,
                  "train/mfu": event.mfu, "train/tokens": event.tokens}
        values.update({f"train/{k}": v for k, v in event.metrics.items()})
        self.log({k: v for k, v in values.items() if v is not None}, event.step)

    @hookimpl
    def trainctl_eval_end(self, event: EvalEnd) -> None:
        prefix = "eval" if event.source == "local" else f"eval_{event.source}"
        self.log({f"{prefix}/{event.split}_loss": event.loss}, event.step)

    @hookimpl
    def trainctl_checkpoint_saved(self, event: CheckpointSaved) -> None:
        self.log({"checkpoint/save_s": event.duration}, event.step)

    @hookimpl
    def trainctl_notice(self, event: Notice) -> None:
        if event.kind == notices.SAMPLES:
            table = self.wandb.Table(columns=["step", "prompt", "text"])
            for prompt, text in zip(event.data["prompts"], event.data["texts"]):
                table.add_data(event.step, prompt, text)
            self.log({"samples": table}, event.step)
        elif event.kind == notices.LAYER_STATS:
            self.log({f"layers/{k}": v for k, v in event.data.items()}, event.step)

    @hookimpl
    def trainctl_run_end(self, event: RunEnd) -> None:
        if self.session is not None:
            self.session.summary.update({"status": event.status, "final_step": event.step})
            self.session.finish(exit_code=0 if event.status != "failed" else 1)
            self.session = None


SPEC = PluginSpec(name="wandb", factory=WandbLogger, config=Config,
                  description="Weights & Biases logging (offline works); files under OUT/wandb.")
