"""The rollout worker's side (``trainctl rollout-worker``): the generator of ``grpo_async.py`` in a
process of its own, serving batches over loopback HTTP (``rollout_wire.py``).

    POST /batch n, base, position:
        not at batch n (just started, restarted, or another worker made n - 1)?
            go to the position (batch base) unless already between base and n; skip to n
        wait up to WAIT_S for weights of a version >= n - k in DIR (else 503, asked again)
        load the newest such version if it is not the one held (rollout_weights.read: safely)
        generate and score batch n (grpo_offpolicy.generate), answer it
    GET /health: {"next": the batch it makes next, "version": the weights it holds}

One request at a time (``http.server.HTTPServer``): a worker generates one batch at a time
anyway, and a trainer asks each worker for one at a time. A weights file that is refused (a
link, a FIFO, not safetensors, other shapes) is said on stderr once and never loaded; the
worker waits for a newer version.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import torch

from trainctl.backends.hf import rollout_weights, rollout_wire
from trainctl.backends.hf.config import GRPOConfig
from trainctl.backends.hf.grpo import InProcessRollouts
from trainctl.backends.hf.grpo_offpolicy import Generated, generate, prepare_generator
from trainctl.backends.hf.grpo_state import ProducerState
from trainctl.kernel.checkpoint_files import NotVerified
from trainctl.kernel.errors import ConfigError

MAX_SKIP = 4096  # batches a request may ask the worker to pass over (n - base): more is no trainer's
WAIT_S = 1.0  # how long a request waits for weights before it is answered 503
POLL_S = 0.02


class RolloutWorker:
    """The generator side of one worker: where its stream is and which weights it holds."""

    def __init__(self, gen: InProcessRollouts, opts: GRPOConfig, weights: Path) -> None:
        self.gen, self.opts, self.weights = gen, opts, weights
        prepare_generator(gen, opts)
        self.params = dict(gen.model.named_parameters())
        self.expected = {name: (tuple(p.shape), p.dtype) for name, p in self.params.items()}
        self.next_index: int | None = None  # None: no position yet
        self.version = -1  # the weights held: -1, the model folder's (never generated from)
        self.refused: set[int] = set()

    def check(self, n: int, base: int, position: ProducerState) -> None:
        """ValueError for a request no trainer sends: one that would make the worker replay or
        skip without end."""
        if n - base > MAX_SKIP:
            raise ValueError(f"batch {n} is more than {MAX_SKIP} batches past the position's {base}")
        if position.consumed > len(self.gen.dataloader()):
            raise ValueError(f"the position's {position.consumed} batches are more than a pass over the prompts holds")

    def batch(self, n: int, base: int, position: ProducerState) -> Generated | str:
        """Batch ``n``, or why it cannot be made yet (no weights new enough)."""
        if self.next_index is None or not base <= self.next_index <= n:
            self.gen.restore(position)
            self.next_index, self.version = base, -1  # a new position: take the newest weights
        while self.next_index < n:  # the other workers' batches
            self.gen.skip()
            self.next_index += 1
        needed = n - self.opts.max_staleness
        deadline = time.monotonic() + WAIT_S
        while not self._take_weights(needed):
            if time.monotonic() >= deadline:
                return f"no weights of version >= {needed} in {self.weights} yet"
            time.sleep(POLL_S)
        done = generate(self.gen, n, self.version)
        self.next_index = n + 1
        return done

    def _take_weights(self, needed: int) -> bool:
        """Hold the newest trustworthy version >= ``needed``; False if there is none."""
        for version in rollout_weights.versions(self.weights):
            if version < max(needed, 0) or version in self.refused:
                continue
            if version == self.version:
                return True
            try:
                tensors = rollout_weights.read(self.weights, version, self.expected)
            except FileNotFoundError:
                continue  # the trainer removed it meanwhile: a newer one exists
            except NotVerified as exc:
                self.refused.add(version)
                print(f"rollout-worker: refused weights {self.weights}/{rollout_weights.file_name(version)}: {exc}",
                      file=sys.stderr, flush=True)
                continue
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(tensors[name])
            self.version = version
            return True
        return False


def handler(worker: RolloutWorker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "trainctl-rollout-worker"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
            pass  # one line per request would drown the worker's own lines

        def _json(self, status: int, doc: dict[str, Any]) -> None:
            self._send(status, json.dumps(doc).encode(), "application/json")

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path != "/health":
                return self._json(404, {"error": "GET /health or POST /batch"})
            self._json(200, {"next": worker.next_index, "version": worker.version})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/batch":
                return self._json(404, {"error": "GET /health or POST /batch"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._json(411, {"error": "a Content-Length is required"})
            if not 0 < length <= rollout_wire.MAX_REQUEST_BYTES:
                return self._json(413, {"error": f"a request is 1 to {rollout_wire.MAX_REQUEST_BYTES} bytes"})
            try:
                n, base, position = rollout_wire.read_request(self.rfile.read(length))
                worker.check(n, base, position)
            except ValueError as exc:
                return self._json(400, {"error": str(exc)})
            try:
                done = worker.batch(n, base, position)
            except ConfigError as exc:  # a reward that raised, TRL refusing a batch: the run's config error
                return self._json(500, {"error": str(exc), "config": True})
            except Exception as exc:  # noqa: BLE001 - answered as one line; the worker serves on
                first = str(exc).splitlines()[0] if str(exc) else ""
                return self._json(500, {"error": f"generation failed: {type(exc).__name__}: {first}"})
            if isinstance(done, str):
                return self._json(503, {"waiting": done})
            self._send(200, rollout_wire.batch(done), "application/octet-stream")

    return Handler


def serve(worker: RolloutWorker, sock: Any) -> None:
    """Serve on the bound, listening ``sock`` until the process is ended."""
    server = HTTPServer(sock.getsockname()[:2], handler(worker), bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
