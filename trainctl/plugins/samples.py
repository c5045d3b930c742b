"""Live samples: every N steps (and when the run ends), text generated from fixed prompts through
the backend, emitted as a ``samples`` notice that every logger records (console shows it, jsonl
writes it, tensorboard and wandb keep it as text).

Generation runs on the training thread between steps, so it never races the optimizer; its
time is not part of any step time. It uses its own seed and leaves the training RNG alone.
Every rank generates (under FSDP each forward is a collective); only the main rank reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from trainctl.hooks import Every, PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import Notice, RunView, StepEnd


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    every: int = 500  # steps between samples; 0 = only at the end
    at_end: bool = True  # also sample when the run completes or is stopped
    prompts: list[str] = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 200  # 0 = no top-k
    seed: int = 1337  # the same seed every time, so samples compare across steps

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError("every must be 0 (only at the end) or more")
        if not self.prompts:
            raise ValueError('prompts must hold at least one prompt, e.g. prompts = ["\\n"]')
        if self.max_new_tokens < 1 or self.temperature <= 0 or self.top_k < 0:
            raise ValueError("max_new_tokens must be >= 1, temperature > 0 and top_k >= 0")


class Samples:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config, self.run = config, run
        self.every = Every(config.every, at_end=False)  # the end is the "ending" decision: a stop ends early too
        self.sampled_step: int | None = None

    def sample(self, step: int) -> None:
        c = self.config
        texts = [
            self.run.generate(prompt, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                              top_k=c.top_k or None, seed=c.seed)
            for prompt in c.prompts
        ]
        self.sampled_step = step
        if not self.run.is_main:
            return
        self.run.emit(Notice(
            step=step, kind=notices.SAMPLES, message=_preview(c.prompts[0] + texts[0]),
            data={"prompts": list(c.prompts), "texts": texts}, time=time.time(),
        ))

    @hookimpl
    def trainctl_step_end(self, event: StepEnd) -> None:
        # the plugin keeps its own cadence: the kernel's intervals are for evaluation and saving
        if self.every.due(event.step, event.max_steps):
            self.sample(event.step)

    @hookimpl
    def trainctl_control(self, view: RunView) -> None:
        # "ending" is asked once, before the final evaluation: the last chance to emit an event
        if view.state == "ending" and self.config.at_end and self.sampled_step != view.step:
            self.sample(view.step)


def _preview(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


SPEC = PluginSpec(name="samples", factory=Samples, config=Config,
                  description="Every N steps, text from fixed prompts through the backend, as a 'samples' event.")
