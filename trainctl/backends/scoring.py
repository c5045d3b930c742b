"""Evaluation for every backend: loss and top-1 token accuracy over fixed batches, with one host
read per split. The backend says how to score one batch; this module keeps the model in eval
mode, without gradients, under the training autocast, and restores training mode. Nothing here
draws random numbers or touches the optimizer.

Two means (``train.eval_loss``), both accumulated on the device:

- ``tokens``: the loss and accuracy over every scored token of the split.
- ``batches``: what a TRL user reads. ``Trainer.evaluation_loop`` repeats each batch's loss (for
  ``SFTTrainer`` its token mean) once per row of the batch and takes the mean, so ``eval_loss``
  weighs each batch's mean by its rows; TRL's ``eval_mean_token_accuracy`` is the plain mean of
  the batches' accuracies. They equal the token mean only when every batch scores as many tokens.

Plugins' metrics (``trainctl_eval_metrics``, passed as ``metrics``) get each batch's logits and
targets when the backend puts them in its ``BatchScore``; their ``(total, count)`` answers are
summed on the device beside the loss and read in the same one host read per split. A metric
missing from some batch of a split (its plugin raised there, reported by the bus) is left out of
that split rather than reported over part of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from trainctl.kernel.backend import Evaluation

MEANS = ("tokens", "batches")


class BatchScore(NamedTuple):
    """Sums over one batch's scored tokens (device tensors)."""

    loss_sum: torch.Tensor  # summed cross-entropy
    correct: torch.Tensor  # tokens whose argmax is the target
    count: torch.Tensor | int  # tokens scored
    rows: int = 1  # the batch's weight in the "batches" loss: its rows, as the Trainer counts them
    logits: torch.Tensor | None = None  # (B, T, V), only when plugins compute metrics (``metrics``)
    targets: torch.Tensor | None = None  # (B, T) aligned with ``logits``, ignored positions negative


Metrics = Callable[[str, torch.Tensor, torch.Tensor], Mapping[str, tuple[torch.Tensor, torch.Tensor]]]


@torch.no_grad()
def evaluate(model: torch.nn.Module, splits: dict[str, Iterable[Any]], score: Callable[[Any], BatchScore],
             autocast: Any, device: torch.device, *, cross_entropy: bool = True, mean: str = "tokens",
             metrics: Metrics | None = None) -> dict[str, Evaluation]:
    if mean not in MEANS:
        raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
    # float64 keeps token counts past 2**24 exact over a whole split; MPS has no float64
    dtype = torch.float32 if device.type == "mps" else torch.float64
    was_training = model.training
    model.eval()
    results = {}
    try:
        for split, batches in splits.items():
            # loss, correct, tokens; then per batch: rows * mean loss, rows, accuracy, batches
            sums = torch.zeros(7, device=device, dtype=dtype)
            extra: dict[str, torch.Tensor] = {}  # plugin metric -> (total, count) summed on the device
            seen: dict[str, int] = {}  # plugin metric -> batches that answered it
            n_seen = 0
            for batch in batches:
                with autocast:
                    s = score(batch)
                loss_sum, correct = s.loss_sum.to(dtype), s.correct.to(dtype)
                count = torch.as_tensor(s.count, device=device).to(dtype)
                per_token = count.clamp(min=1)  # a batch with nothing scored means 0, as SFTTrainer clamps it
                sums += torch.stack([loss_sum, correct, count, s.rows * loss_sum / per_token,
                                     count.new_tensor(s.rows), correct / per_token, count.new_tensor(1)])
                n_seen += 1
                if metrics is not None and s.logits is not None:
                    for name, (total, n) in metrics(split, s.logits, s.targets).items():
                        pair = torch.stack([torch.as_tensor(total, device=device).to(dtype),
                                            torch.as_tensor(n, device=device).to(dtype)])
                        extra[name] = extra[name] + pair if name in extra else pair
                        seen[name] = seen.get(name, 0) + 1
                del s  # this batch's logits, before the next batch's
            names = [name for name in extra if seen[name] == n_seen]
            read = torch.cat([sums, *(extra[name] for name in names)]).tolist()  # host sync: once per split
            loss_sum, correct, count, weighted, rows, accuracies, n_batches = read[:7]
            plugin_metrics = {name: read[7 + 2 * i] / max(read[8 + 2 * i], 1.0) for i, name in enumerate(names)}
            if mean == "batches":
                loss, accuracy = weighted / max(rows, 1.0), accuracies / max(n_batches, 1.0)
            else:
                loss, accuracy = loss_sum / max(count, 1.0), correct / max(count, 1.0)
            results[split] = Evaluation(loss=loss, accuracy=accuracy, tokens=int(count), cross_entropy=cross_entropy,
                                        loss_mean=mean, metrics=plugin_metrics)
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
