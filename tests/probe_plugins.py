"""A loss-terms plugin that records what the backend hands to ``trainctl_loss_terms`` and adds
nothing (a zero term), so the conformance tests can check the documented values."""

from __future__ import annotations

from dataclasses import dataclass

from trainctl.hooks import PluginSpec, RunInfo, hookimpl

CALLS: list[dict] = []


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeConfig:
    pass


class Probe:
    def __init__(self, config: ProbeConfig, run: RunInfo) -> None:
        CALLS.clear()

    @hookimpl
    def trainctl_loss_terms(self, logits, targets, loss):
        import torch
        import torch.nn.functional as F

        valid = targets >= 0  # ignored positions are negative (-1 or -100)
        flat = logits.detach().float().flatten(0, 1)  # (B*T, V)
        mean_ce = F.cross_entropy(flat, targets.flatten().clamp(min=0), reduction="none")[valid.flatten()].mean()
        CALLS.append({
            "logits": tuple(logits.shape), "targets": tuple(targets.shape), "targets_dtype": targets.dtype,
            "loss": loss.detach().float().clone(), "loss_dim": loss.dim(), "mean_ce": mean_ce,
            "ignored": int((~valid).sum()), "logits_grad": logits.requires_grad,
        })
        return "probe", torch.zeros((), device=loss.device)


@hookimpl
def trainctl_register_plugins(register):
    register(PluginSpec(name="probe", factory=Probe, config=ProbeConfig, description="records loss_terms arguments"))
