"""Asynchronous checkpoint writes: while the checkpoint plugin stages a save, the code that
writes a checkpoint's big files hands it the write to run later (on the plugin's background
thread) instead of writing now.

A writer asks :func:`pending`: None means write now; otherwise it copies what it will write
(tensors to CPU memory: the staging the loop waits for) and appends a callable
``write(process_group)`` that writes the copy. ``process_group`` is the group the deferred write
may use for its collectives (a distributed checkpoint's planning), apart from the group training
uses, so the two threads never interleave collectives on one group; None: the default group.

No torch here: the kernel imports this on the ``--help`` path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

#: ``write(process_group)``: writes what was staged
Write = Callable[[Any], None]

_pending: ContextVar[list[Write] | None] = ContextVar("trainctl_staged_writes", default=None)


@contextmanager
def staging() -> Iterator[list[Write]]:
    """Collect the writes deferred inside the block (the plugin runs them later, in order)."""
    writes: list[Write] = []
    token = _pending.set(writes)
    try:
        yield writes
    finally:
        _pending.reset(token)


def pending() -> list[Write] | None:
    """Where to append a deferred write, or None to write now."""
    return _pending.get()
