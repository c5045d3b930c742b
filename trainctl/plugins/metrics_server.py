"""The prometheus plugin's HTTP endpoint: ``GET /metrics`` on one daemon thread that multiplexes
every connection (``selectors``), so no client, however slow, delays a scrape.

Anyone who can reach the port may connect (every local user; the network too when bound to
0.0.0.0), so the endpoint bounds what one connection can take:

- **A deadline per connection, in total.** From connecting, a client has ``timeout`` seconds to
  send its request head and read the answer; then the connection is closed. (A timeout per
  ``recv`` on a single thread, as before, let one byte every 0.9 s hold the endpoint for hours
  while every scrape timed out.)
- **A cap on open connections.** Past ``max_connections``, a new connection closes the oldest one
  still sending its request: every connection is answered as soon as its head is in, so the
  oldest is the slowest. Descriptors and memory stay bounded whatever the number of clients.
- **A bounded head.** At most 64 KiB are read; the answer is sent without blocking, so a client
  that never reads holds only its own connection, until its deadline.

Why not prometheus_client's own server (``start_http_server``): it gives every connection a thread
with no deadline and no cap, the same slow-loris with threads. And every blocking call gives up the
GIL, and getting it back while the training thread runs Python can take up to the interpreter's
5 ms switch interval: the WSGI stack (a thread per request, buffered reads, several writes) pays
that about ten times per scrape, this loop four times (select, accept, recv, send: on Linux
``TCP_DEFER_ACCEPT`` has the kernel hand over a connection once its request is in, which is then
answered at once), which measured a 3-4x lower median scrape latency under training
(docs/benchmarks.md). A silent client is handed over after about a second anyway, and then has
its deadline like any other. The exposition itself is
prometheus_client's (``generate_latest``).
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

MAX_HEAD = 65536  # a GET from Prometheus is a few hundred bytes
ACCEPT_BATCH = 32  # connections accepted per wake-up: a flood cannot starve the open ones


@dataclass(slots=True, eq=False)
class Connection:
    sock: socket.socket  # blocking, used only with MSG_DONTWAIT (no fcntl call per connection)
    deadline: float  # time.monotonic() by which it is answered or closed
    head: bytearray = field(default_factory=bytearray)
    reply: memoryview | None = None  # what is left to send, once the head is in
    events: int = 0  # what the selector watches for it; 0: not registered (answered on accept)


class MetricsServer:
    def __init__(self, address: str, port: int, registry: Any, *, timeout: float, max_connections: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = socket.create_server((address, port), family=family)  # OSError if the port is taken
        self.sock.setblocking(False)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):  # Linux: accept a connection once its request is in
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        self.address = self.sock.getsockname()[:2]
        self.registry, self.timeout, self.max_connections = registry, timeout, max_connections
        self.open: dict[socket.socket, Connection] = {}  # oldest first (dicts keep insertion order)
        self.selector = selectors.DefaultSelector()
        self.wake, self.waker = socket.socketpair()  # close() writes to waker: the loop returns
        self.selector.register(self.sock, selectors.EVENT_READ)
        self.selector.register(self.wake, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._serve, name="trainctl-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            self.waker.send(b"x")
        except OSError:
            pass
        self.thread.join(timeout=5)
        for sock in (self.sock, self.wake, self.waker):  # the port is free once close() returns
            sock.close()

    # --- the loop -----------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                wait = None
                if self.open:  # the oldest connection has the nearest deadline
                    wait = max(0.0, next(iter(self.open.values())).deadline - time.monotonic())
                for key, _ in self.selector.select(wait):
                    if key.fileobj is self.wake:
                        return
                    if key.fileobj is self.sock:
                        self._accept()
                    elif (conn := self.open.get(key.fileobj)) is not None:  # type: ignore[arg-type]
                        self._write(conn) if conn.reply is not None else self._read(conn)
                self._expire()
        finally:
            for conn in list(self.open.values()):
                self._drop(conn)
            self.selector.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.sock.accept()
            except OSError:  # none left (BlockingIOError), out of descriptors, reset before accepted
                return
            if len(self.open) >= self.max_connections:
                reading = [c for c in self.open.values() if c.reply is None]
                self._drop(reading[0] if reading else next(iter(self.open.values())))
            conn = Connection(sock=sock, deadline=time.monotonic() + self.timeout)
            self.open[sock] = conn
            self._read(conn)  # the request is usually in (TCP_DEFER_ACCEPT): answered with no epoll call
            if sock in self.open and not conn.events:
                self._watch(conn, selectors.EVENT_READ)

    def _read(self, conn: Connection) -> None:
        try:
            chunk = conn.sock.recv(MAX_HEAD - len(conn.head), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.head += chunk
        # the end of the head, the size limit, or the client closed its side: answer what came
        if not chunk or b"\r\n\r\n" in conn.head or len(conn.head) >= MAX_HEAD:
            if not conn.head:
                self._drop(conn)
                return
            conn.reply = memoryview(self._answer(bytes(conn.head)))
            self._write(conn)

    def _write(self, conn: Connection) -> None:
        assert conn.reply is not None
        try:
            sent = conn.sock.send(conn.reply, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        conn.reply = conn.reply[sent:]
        if not conn.reply:
            self._drop(conn)
        elif conn.events != selectors.EVENT_WRITE:  # the client reads slowly: the rest when it can
            self._watch(conn, selectors.EVENT_WRITE)

    def _watch(self, conn: Connection, events: int) -> None:
        if conn.events:
            self.selector.modify(conn.sock, events)
        else:
            self.selector.register(conn.sock, events)
        conn.events = events

    def _expire(self) -> None:
        now = time.monotonic()
        while self.open:
            oldest = next(iter(self.open.values()))
            if oldest.deadline > now:
                return
            self._drop(oldest)

    def _drop(self, conn: Connection) -> None:
        self.open.pop(conn.sock, None)
        if conn.events:
            self.selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()

    def _answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method in (b"GET", b"HEAD") and path in (b"/metrics", b"/"):
            status, kind, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        else:
            status, kind, body = "404 Not Found", "text/plain", b"trainctl serves /metrics\n"
        reply = (f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n").encode()
        return reply if method == b"HEAD" else reply + body
