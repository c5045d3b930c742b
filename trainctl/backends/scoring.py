"""Evaluation for every backend: token-mean loss and top-1 token accuracy over fixed batches,
with one host read per split. The backend says how to score one batch; this module keeps the
model in eval mode, without gradients, under the training autocast, and restores training mode.
Nothing here draws random numbers or touches the optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from trainctl.kernel.backend import Evaluation


class BatchScore(NamedTuple):
    """Sums over one batch's scored tokens (device tensors)."""

    loss_sum: torch.Tensor  # summed cross-entropy
    correct: torch.Tensor  # tokens whose argmax is the target
    count: torch.Tensor | int  # tokens scored


@torch.no_grad()
def evaluate(model: torch.nn.Module, splits: dict[str, Iterable[Any]], score: Callable[[Any], BatchScore],
             autocast: Any, device: torch.device, *, cross_entropy: bool = True) -> dict[str, Evaluation]:
    was_training = model.training
    model.eval()
    results = {}
    try:
        for split, batches in splits.items():
            sums = torch.zeros(3, device=device, dtype=torch.float32)
            for batch in batches:
                with autocast:
                    s = score(batch)
                sums += torch.stack([s.loss_sum.float(), s.correct.float(), torch.as_tensor(s.count, device=device).float()])
            loss_sum, correct, count = sums.tolist()  # host sync: evaluation only, once per split
            n = max(count, 1.0)
            results[split] = Evaluation(loss=loss_sum / n, accuracy=correct / n, tokens=int(count), cross_entropy=cross_entropy)
    finally:
        model.train(was_training)
    return results


def top1(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy, correct top-1 predictions and scored tokens of (B, T, V) logits
    against (B, T) targets."""
    flat, tgt = logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)  # (B*T, V), (B*T,)
    valid = tgt != ignore_index
    loss_sum = torch.nn.functional.cross_entropy(flat, tgt, ignore_index=ignore_index, reduction="sum")
    correct = ((flat.argmax(-1) == tgt) & valid).sum()
    return loss_sum, correct, valid.sum()
