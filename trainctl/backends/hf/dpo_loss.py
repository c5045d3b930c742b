"""The DPO loss and its reward metrics, from the summed completion log-probs of a pair batch.

TRL computes these inline in ``DPOTrainer._compute_loss`` (trl 1.16, ``trl/trainer/dpo_trainer.py``),
between the forward and a dozen ``.item()`` reads per micro-batch, so there is no function to call:
the formulas below are that method's for ``f_divergence_type = "reverse_kl"`` (standard DPO), one
loss type, no WPO weighting and no ``ld_alpha``, in the same operations and order, so the losses
are bit-identical to what ``DPOTrainer.train()`` logs, and the metrics equal to float32 rounding
(TRL divides two host reads in float64). Everything stays on the device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


def policy_metrics(outputs: Any, completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's token metrics of the policy's forward (its fused LM head's ``entropy``,
    ``mean_logits``: the mean over the vocabulary, and ``is_top1``), 0-d device tensors:
    ``entropy`` over every completion token, ``logits/chosen`` and ``logits/rejected`` the mean
    logit over each side's completion tokens, ``mean_token_accuracy`` the chosen completions'
    top-1 accuracy. ``completion_mask`` is the collated (2B, T) mask, chosen rows first."""
    mask = completion_mask[..., 1:]  # (2B, T-1): the positions the shifted log-probs score
    seq_len = mask.size(1)
    entropy = (outputs.entropy[:, -seq_len:].detach() * mask).sum() / mask.sum().clamp(min=1)
    chosen_mean_logits, rejected_mean_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)  # (B, T-1) each
    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    chosen_is_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
    chosen_tokens = chosen_mask.sum().clamp(min=1)  # no completion token: 0 / 1, TRL's 0.0
    return {
        "entropy": entropy,
        "logits/chosen": chosen_mean_logits[chosen_mask.bool()].sum() / chosen_tokens,
        "logits/rejected": rejected_mean_logits[rejected_mask.bool()].sum() / rejected_mask.sum().clamp(min=1),
        "mean_token_accuracy": (chosen_is_top1 & chosen_mask.bool()).sum() / chosen_tokens,
    }
