"""The process group of a run under ``torchrun`` or ``accelerate launch``, and the few
collectives the kernel and plugins need on top of the backend's gradient all-reduce.

trainctl never launches processes: it reads ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (set by the
launcher) and, when ``WORLD_SIZE > 1``, joins the group through ``env://`` (``MASTER_ADDR``,
``MASTER_PORT``): gloo on CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``). Every
collective has the group's timeout (``train.dist_timeout_s``), so a rank that died makes the
others fail with a clear error instead of waiting forever.

What is collective, and when (all ranks reach these at the same points of the loop):

- ``agree(decision)``: after the plugins' control decisions, one all-reduce (MAX) of five int
  flags; the reasons travel (``all_gather_object``) only when a flag is set, which is rare;
- ``mean_(values)``: the logged values of a logged step, averaged over ranks (with the kernel's
  one host sync of that step);
- ``broadcast``/``all_ok``/``gather``: checkpoint writing and resume, rare.

With one process every method returns at once and torch is never imported here.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from trainctl.hooks.events import Control
from trainctl.kernel.backend import Distributed
from trainctl.kernel.errors import ConfigError

FLAGS = ("stop", "save", "evaluate", "pause", "failed")


class Group:
    """This process's place among the ranks and the collectives over them."""

    def __init__(self, dist: Distributed, *, timeout_s: float = 120.0, device: str = "auto") -> None:
        self.rank, self.local_rank, self.world_size = dist.rank, dist.local_rank, dist.world_size
        self.timeout_s = timeout_s
        self.started = False
        self.device = "cpu"
        if self.world_size > 1:
            self._start(device)

    def _start(self, device: str) -> None:
        import torch
        import torch.distributed as td

        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE is {self.world_size} but {' and '.join(missing)} is not set; "
                "start distributed runs with torchrun or accelerate launch"
            )
        cuda = torch.cuda.is_available() and not device.startswith(("cpu", "mps"))
        if cuda:
            torch.cuda.set_device(self.local_rank)  # before the group: nccl binds to it
            self.device = f"cuda:{self.local_rank}"
        if td.is_initialized():  # someone (accelerate's PartialState) got there first: use it
            return
        timeout = datetime.timedelta(seconds=self.timeout_s)
        td.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=timeout,
            **({"device_id": torch.device(self.device)} if cuda else {}),
            **self._elastic_store(timeout),
        )
        self.started = True

    def _elastic_store(self, timeout: datetime.timedelta) -> dict[str, Any]:
        """Under torchrun the agent's store (``TORCHELASTIC_USE_AGENT_STORE``, torch's default)
        outlives a restart of the group, and with it the previous attempt's addresses: gloo's
        ranks would connect to the dead rank's old port ("Connection refused"). Each attempt gets
        its own prefix, as torchelastic meant it to. Without it
        (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) rank 0 hosts a new store on a new port every
        round, which holds no old address, and env:// is left to do that: the restart count is
        the agent's own, so a prefix made of it parts the ranks of a group whose agents differ
        (a node that joins after a failure restart counts 0, the survivors 1: both waited)."""
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
            return {}
        import torch.distributed as td

        store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size,
                            is_master=False, timeout=timeout)
        return {"store": td.PrefixStore(f"trainctl/attempt_{attempt}", store), "rank": self.rank,
                "world_size": self.world_size}

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # --- per step ---------------------------------------------------------------------------

    def agree(self, decision: Control) -> Control:
        """Every rank's decision, combined: a flag set on any rank is set on all (MAX)."""
        if not self.distributed:
            return decision
        import torch
        import torch.distributed as td

        flags = torch.tensor([int(getattr(decision, f)) for f in FLAGS], dtype=torch.int32, device=self.device)
        td.all_reduce(flags, op=td.ReduceOp.MAX)
        agreed = dict(zip(FLAGS, (bool(v) for v in flags.tolist())))  # host read: the collective already waited
        if not any(agreed.values()):
            return Control()
        reasons: list[Any] = [None] * self.world_size
        td.all_gather_object(reasons, decision.reason)  # only when something was decided: rare
        agreed["pause"] = agreed["pause"] and not agreed["stop"]
        reason = ", ".join(sorted({r for rs in reasons if rs for r in rs.split(", ")}))
        return Control(**agreed, reason=reason)

    def mean_(self, values: Any) -> Any:
        """Average a tensor over ranks, in place (logged steps only)."""
        if self.distributed:
            import torch.distributed as td

            td.all_reduce(values, op=td.ReduceOp.SUM)
            values /= self.world_size
        return values

    # --- rare: checkpoints and resume -------------------------------------------------------

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def all_ok(self, ok: bool) -> bool:
        """True on every rank if ``ok`` was true on every rank."""
        return all(self.gather(bool(ok)))

    def explain(self, exc: BaseException) -> str | None:
        """A run-ending error from a collective, said plainly; None for any other error."""
        if not self.distributed:
            return None
        text = str(exc)
        if not any(word in text for word in ("gloo", "NCCL", "Timed out", "Connection reset", "Connection closed")):
            return None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return (f"another rank died or stopped answering (collectives wait at most train.dist_timeout_s = "
                f"{self.timeout_s:g} s); check the other ranks' logs. {type(exc).__name__}: {first}")

    def close(self) -> None:
        if self.started:
            import torch.distributed as td

            if td.is_initialized():
                try:  # leave together: a rank tearing down while a peer still talks to it aborts
                    td.barrier()
                except Exception:  # a dead peer: nothing left to wait for
                    pass
                td.destroy_process_group()
            self.started = False
