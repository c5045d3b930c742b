"""Connection limits for the eval worker's HTTP server, as a subclass of uvicorn's h11 protocol.

uvicorn times out an idle keep-alive connection, but not one that is slow to send its request:
a client that trickles header bytes (slowloris) holds its socket, and a file descriptor, for as
long as it likes. Here every connection must deliver a complete request head within
``request_timeout_s`` of connecting (or of its previous answer), and at most ``max_connections``
are open: past that, the oldest connection that has not yet sent a request is closed, so a
client that asks for something (``/health``) is still served while sockets are being hoarded.
The body's own deadline is the application's (:mod:`trainctl.remote.app`).
"""

from __future__ import annotations

from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def limited_protocol(request_timeout_s: float, max_connections: int) -> type:
    class LimitedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._opened = self.loop.time()
            self._arm()
            open_ = [c for c in self.connections if not c.transport.is_closing()]  # closing: gone next tick
            if len(open_) > max_connections:
                waiting = [c for c in open_ if c is not self and c._waiting()]
                victim = min(waiting, key=lambda c: c._opened) if waiting else self
                victim.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if not self._waiting():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._opened = self.loop.time()
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting(self) -> bool:
            """No request head received yet (between requests: idle or sending one slowly)."""
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout_s, self._expire)

        def _disarm(self) -> None:
            deadline = getattr(self, "_deadline", None)
            if deadline is not None:
                deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._waiting() and not self.transport.is_closing():
                self.transport.close()

    return LimitedH11Protocol
