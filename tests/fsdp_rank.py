"""``torchrun ... tests/fsdp_rank.py OUT --set KEY=VALUE ...``: a real trainctl run (config, process
group, backend) on each rank, probed from inside: how much of the parameters and optimizer state
this rank holds (its local shards, measured), and whether a non-finite step leaves its shards of
the parameters and optimizer state bit-identical, with the fused AdamW (``found_inf``), with
an unfused one and with Muon (the snapshot/``torch.where`` path). Writes ``OUT/rank{N}.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trainctl.backends.finite_update import FiniteUpdate, local, parts
from trainctl.backends.optim import build_optimizer
from trainctl.backends.step import MicroLoss
from trainctl.kernel import config as cfg
from trainctl.kernel.registry import Registry
from trainctl.kernel.run import Run


def shards(stepper) -> list[torch.Tensor]:
    """This rank's part of every parameter and optimizer state tensor, copied."""
    out = [local(p.detach()).clone() for p in stepper.params]
    for state in (s for optimizer in parts(stepper.optimizer) for s in optimizer.state.values()):
        out += [local(v).clone() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return out


def nonfinite_step_changes_nothing(backend, step: int) -> bool:
    stepper = backend.stepper
    before = shards(stepper)

    def poisoned(model, batch, with_logits):
        out = backend._loss(model, batch, with_logits)
        return MicroLoss(share=out.share * float("nan"))

    batches = [backend._batch("train", backend._draw("train", step, m)) for m in backend.micro]
    out = stepper.run(batches, poisoned, tokens=1)
    after = shards(stepper)
    same = all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)
    return same and bool(out.skipped)


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    sets = [v for k, v in zip(overrides[::2], overrides[1::2]) if k == "--set"]
    run = Run(cfg.load(None, Registry.discover(), overrides=sets, out_dir=str(out / "run")), Registry.discover(), resume="never")
    backend, stepper = run.backend, run.backend.stepper
    backend.train_step(0)  # the optimizer state exists from here on
    params_local = sum(local(p).numel() for p in stepper.params)
    params_total = sum(p.numel() for p in stepper.params)
    state = [v for s in stepper.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    report = {
        "params_local": params_local, "params_total": params_total,
        "state_local": sum(local(v).numel() for v in state), "state_total": sum(v.numel() for v in state),
        "sharded": all(type(p).__name__ == "DTensor" for p in stepper.params),
        "fused_skip": nonfinite_step_changes_nothing(backend, 1),
    }
    backend.train_step(2)  # a finite step after the skipped one still trains
    unfused = torch.optim.AdamW([{"params": stepper.params, "lr_scale": 1.0}], lr=1e-3, foreach=False)
    stepper.optimizer, stepper.update = unfused, FiniteUpdate(unfused)
    backend.train_step(3)  # creates the unfused optimizer's state
    report["unfused_skip"] = nonfinite_step_changes_nothing(backend, 4)
    muon = build_optimizer(backend.raw_model, name="muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                           device_type="cpu", muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.1)
    stepper.optimizer, stepper.update = muon, FiniteUpdate(muon)
    backend.train_step(5)  # creates Muon's (sharded) momentum
    report["muon_skip"] = nonfinite_step_changes_nothing(backend, 6)
    (out / f"rank{run.group.rank}.json").write_text(json.dumps(report))
    run.close()


if __name__ == "__main__":
    main()
