"""The checkpoint plugin's background thread for async saves: one save in flight at a time, and
collectives of its own (two threads making collectives on one process group could interleave
them: torchtitan gives its async checkpointer a gloo group of its own for the same reason)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from trainctl.kernel.distributed import Group


class Background:
    """Runs one save at a time on a thread; ``wait`` is where its failure reaches the caller."""

    def __init__(self, group: Group) -> None:
        self.run_group = group
        self.executor: ThreadPoolExecutor | None = None
        self.inflight: Future | None = None
        self._group: SideGroup | None = None

    @property
    def group(self) -> SideGroup:
        """The background thread's collectives. Made at the first async save, which every rank
        reaches at the same step (creating a process group is itself collective)."""
        if self._group is None:
            self._group = SideGroup(self.run_group)
        return self._group

    def submit(self, work: Callable[..., None], *args: Any) -> None:
        self.group  # noqa: B018 -- on the training thread, where every rank is at the same point
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainctl-checkpoint")
        self.inflight = self.executor.submit(work, *args)

    def wait(self) -> None:
        """Until the save in flight (if any) is complete; raises its failure."""
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            inflight.result()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()


class SideGroup:
    """``gather`` and ``broadcast`` (as :class:`~trainctl.kernel.distributed.Group`'s) on a gloo
    process group of their own, for the background thread: collectives of two threads on one
    group could interleave. One process: answers at once, ``pg`` None."""

    def __init__(self, group: Group) -> None:
        self.distributed, self.world_size, self.pg = group.distributed, group.world_size, None
        if group.distributed:
            import datetime

            import torch.distributed as td

            self.pg = td.new_group(backend="gloo", timeout=datetime.timedelta(seconds=group.timeout_s))

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj, group=self.pg)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]
