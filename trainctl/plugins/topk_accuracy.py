"""Top-k token accuracy on evaluation: the share of scored tokens whose target is among the
model's k most likely tokens, for each k of ``[plugin.topk_accuracy] k`` (``top5_accuracy``
...). An eval metric (``trainctl_eval_metrics``): per batch it answers (hits, scored tokens) as
device tensors, which the kernel sums over the split; training never calls it. ``k = [1]`` is
the kernel's own ``accuracy`` under ``train.eval_loss = "tokens"``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainctl.hooks import PluginSpec, RunInfo, hookimpl


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    k: tuple[int, ...] = (5,)

    def __post_init__(self) -> None:
        if not self.k or any(k < 1 for k in self.k):
            raise ValueError("k must list one or more positive ranks, e.g. k = [1, 5]")


class TopKAccuracy:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.ks = sorted(set(config.k))

    @hookimpl
    def trainctl_eval_metrics(self, split: str, logits: Any, targets: Any) -> dict[str, tuple[Any, Any]]:
        valid = targets >= 0  # (B, T): ignored positions are negative (-1 or -100)
        top = logits.topk(min(self.ks[-1], logits.size(-1)), dim=-1).indices  # (B, T, k_max), most likely first
        hits = top == targets.unsqueeze(-1)  # (B, T, k_max): at most one True per position
        scored = valid.sum()
        return {f"top{k}_accuracy": ((hits[..., :k].any(-1) & valid).sum(), scored) for k in self.ks}


SPEC = PluginSpec(name="topk_accuracy", factory=TopKAccuracy, config=Config,
                  description="Top-k token accuracy of each evaluation (an eval metric; top5_accuracy by default).")
