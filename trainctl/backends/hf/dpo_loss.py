"""The DPO loss and its reward metrics, from the summed completion log-probs of a pair batch.

TRL computes these inline in ``DPOTrainer._compute_loss`` (trl 1.16, ``trl/trainer/dpo_trainer.py``),
between the forward and nine ``.item()`` reads per micro-batch, so there is no function to call:
the formulas below are that method's for ``f_divergence_type = "reverse_kl"`` (standard DPO), one
loss type, no WPO weighting and no ``ld_alpha``, in the same operations and order, so the values
are bit-identical to what ``DPOTrainer.train()`` logs. Everything stays on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairLoss(NamedTuple):
    per_pair: torch.Tensor  # (B,) the loss of each pair; the batch loss is its mean
    chosen_rewards: torch.Tensor  # (B,) beta * (logp - ref logp), detached
    rejected_rewards: torch.Tensor  # (B,)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, completion_mask: torch.Tensor, *, beta: float, loss_type: str,
             label_smoothing: float = 0.0) -> PairLoss:
    """Per-pair loss of ``loss_type``; ``completion_mask`` is the collated (2B, T) mask, chosen
    rows first (``ipo`` normalises by completion length with it)."""
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * delta_score)
    elif loss_type == "ipo":  # length-normalised, as TRL does (confirmed with the IPO authors, per its comment)
        chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
        chosen_avg_score = chosen_logratios / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_avg_score = rejected_logratios / rejected_mask.sum(dim=1).clamp(min=1.0)
        per_pair = (chosen_avg_score - rejected_avg_score - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta_score)
        per_pair = (clean - flipped) / (1 - 2 * label_smoothing)
    else:  # the config's Literal keeps this unreachable from TOML
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return PairLoss(per_pair, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def reward_metrics(loss: PairLoss, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's logged names and values for one batch (means over its pairs, 0-d device tensors)."""
    chosen, rejected = loss.chosen_rewards, loss.rejected_rewards
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
