"""Weight and gradient norms per group of parameters (``layer.N``, ``embedding``, ``head``), for
the ``layer_stats`` plugin, any backend. Each backend says which parameters form a group."""

from __future__ import annotations

import torch


@torch.no_grad()
def group_norms(groups: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """``{group}.weight_norm`` and, where gradients exist (those of the last step),
    ``{group}.grad_norm``: 2-norms over the group. One host sync for all of them."""
    names: list[str] = []
    norms: list[torch.Tensor] = []
    for group, params in groups.items():
        names.append(f"{group}.weight_norm")
        norms.append(torch.nn.utils.get_total_norm(params, foreach=True))
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            names.append(f"{group}.grad_norm")
            norms.append(torch.nn.utils.get_total_norm(grads, foreach=True))
    # FSDP: a norm over DTensor shards is a partial one; full_tensor() all-reduces it (every rank calls this)
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    values = torch.stack([n.float().to(norms[0].device) for n in norms]).tolist()  # host sync: once, on the steps that asked
    return dict(zip(names, values))
