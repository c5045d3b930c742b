"""GRPO batches from rollout-worker processes (``[hf.grpo] rollout_workers``, ``trainctl
rollout-worker``): the generator of ``grpo_async.py`` out of the trainer's process, so
generation and training no longer share one interpreter (its GIL).

    trainer (kernel thread)                     one client thread per worker w (of W)
    next_rollout(step): wait for batch `step`   for n = start + w, start + w + W, ...:
      (Waiting after 0.5 s while no worker          wait until published version >= n - k (or stop)
       that could make it answers)                  POST /batch n, with the stream's position
    for_training: IS ratio if stale                   at the last batch the trainer took
    train the update                                 connection refused / reset: worker down, retry
    publish(version): OUT/rollout-weights/            every 0.5 s; 503 (no weights yet): retry
      weights-v{version}.safetensors                 queue the answer (batch n, its version)

Batch n goes to worker n mod W (a fixed rule: every batch has one place, and a worker that is
down holds up only its own batches); each worker goes on from the position it is sent, skipping
the batches of the others. The trainer takes them in order: a batch another worker made early
waits for the one before it, which taken later would be stale. The worker makes batch n from
weights of a version >= n - k, the newest it finds (``rollout_weights.py``), so staleness <= k
as in the thread (and no batch is dropped). The trainer's side (importance sampling, the
checkpoint's part: pending batches discarded, the stream position saved) is
``grpo_offpolicy.py``'s, shared with the thread.

A worker that cannot be reached (not started yet, killed, restarting) is retried every
``RETRY_S``; the kernel is answered :class:`trainctl.kernel.rollout.Waiting` meanwhile, so the
status says so and a stop still saves. A worker that answers an error fails the run with its
line, as a failure in the thread does (a reward that raised: a ConfigError, the config's fault).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

from trainctl.backends.hf import rollout_weights, rollout_wire
from trainctl.backends.hf.config import GRPOConfig, worker_address
from trainctl.backends.hf.grpo import InProcessRollouts
from trainctl.backends.hf.grpo_offpolicy import Clock, Generated, OffPolicyRollouts
from trainctl.backends.hf.grpo_state import Expected, ProducerState
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.rollout import Rollout, Waiting

WEIGHTS_DIR = "rollout-weights"  # under the run directory: `trainctl rollout-worker --weights OUT/rollout-weights`
RETRY_S = 0.5  # how often an unreachable worker is tried again, and how long the kernel waits before Waiting
CONNECT_S = 2.0
GENERATION_S = 600.0  # a request's read timeout: one generation and scoring


class WorkerFailed(RuntimeError):
    """A worker answered an error: the run fails with its line."""


class RemoteRollouts(OffPolicyRollouts):
    """A :class:`trainctl.kernel.rollout.Producer` whose batches rollout workers make over
    loopback, at most ``max_staleness`` versions behind the trainer's policy."""

    def __init__(self, *, trainer_side: InProcessRollouts, opts: GRPOConfig, grad_accum: int, weights: Path) -> None:
        super().__init__(trainer_side=trainer_side, opts=opts, grad_accum=grad_accum)
        self.workers = list(opts.rollout_workers)
        self.weights = weights
        self.device = next(self.model.parameters()).device
        self.up = [True] * len(self.workers)  # not refused since its last answer (a slow first one is not down)
        self.base = 0  # the index of the batch the trainer takes next: self.position is the stream there
        self.threads: list[threading.Thread] = []
        self.written = -1  # the newest version whose weights file is (being) written
        trainer = self.trainer
        self.expected = Expected(  # what a worker's batch must fit: checked as a checkpoint's buffer is
            settings={}, defaults={}, batch_size=trainer.args.per_device_train_batch_size, micro_batches=grad_accum,
            max_completion_length=opts.max_completion_length,
            vocab_size=self.model.get_input_embeddings().num_embeddings,
            passes=len(trainer_side.dataloader()), shuffles=trainer_side.generator() is not None)

    # --- the Producer protocol ----------------------------------------------------------------

    def next_rollout(self, step: int, version: int) -> Rollout | Waiting:
        """Batch ``self.base``, the next in order, waiting for the worker that owes it (a later
        batch another worker has made waits: taken first, it would leave this one to be dropped);
        :class:`Waiting` after ``RETRY_S`` while that worker is down."""
        if not self.threads:
            self._start(step, version)
        assert self.trainer_clock is not None
        waited, deadline = time.perf_counter(), time.perf_counter() + RETRY_S
        with self.cond:
            while self.base not in self.queue and self.error is None:
                owed = self.base % len(self.workers)
                if not self.up[owed] and time.perf_counter() >= deadline:
                    self.trainer_clock.waiting += time.perf_counter() - waited
                    return Waiting(reason=f"rollout worker {self.workers[owed]} unreachable (batch {self.base}); "
                                          f"retrying every {RETRY_S:g} s", workers_up=sum(self.up), workers=len(self.workers))
                self.cond.wait(RETRY_S / 5)
            if self.error is not None:
                raise self.error
            done = self.queue.pop(self.base)
            self.base, self.position = self.base + 1, done.position  # together: a client sends them as a pair
            up = sum(self.up)
        return self.handed(done, waited_s=time.perf_counter() - waited, generator_idle=None, workers_up=up)

    def publish(self, version: int) -> None:
        """Write the stepped weights as ``version`` for the workers, then let them ask for more."""
        with self.cond:
            self.written = version  # a worker may read it as soon as the file is there
        rollout_weights.write(self.weights, version, self.model)  # host copy: one per step, the workers' only input
        with self.cond:
            self.published = version
            self.cond.notify_all()

    # --- the client threads -------------------------------------------------------------------

    def _start(self, step: int, version: int) -> None:
        rollout_weights.clear(self.weights)  # versions of an earlier run are not this one's
        self.base = step
        self.publish(version)
        self.trainer_clock = Clock()
        for w in range(len(self.workers)):
            thread = threading.Thread(target=self._client, args=(w, step), name=f"trainctl-rollout-client-{w}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _client(self, w: int, start: int) -> None:
        host, port = worker_address(self.workers[w])
        n = start + w
        while self.may_start(n):
            with self.cond:
                base, position = self.base, self.position
            try:
                done = self._ask(host, port, n, min(base, n), position)
            except (OSError, http.client.HTTPException):  # refused, reset, killed mid-answer: it is down
                self._mark(w, up=False)
                time.sleep(RETRY_S)
                continue
            except BaseException as exc:  # noqa: BLE001 - handed to the trainer, which ends the run with it
                with self.cond:
                    self.error = exc if isinstance(exc, (WorkerFailed, ConfigError)) else WorkerFailed(
                        f"rollout worker {self.workers[w]}: {type(exc).__name__}: {exc}")
                    self.cond.notify_all()
                return
            self._mark(w, up=True)
            if done is None:  # it has no weights new enough yet
                time.sleep(RETRY_S / 10)
                continue
            with self.cond:
                self.queue[n] = done
                self.cond.notify_all()
            n += len(self.workers)

    def _mark(self, w: int, *, up: bool) -> None:
        with self.cond:
            self.up[w] = up
            self.cond.notify_all()

    def _ask(self, host: str, port: int, n: int, base: int, position: ProducerState) -> Generated | None:
        """Batch ``n`` from the worker; None when it answers 503 (weights not there yet)."""
        body = rollout_wire.request(n, base, position)
        conn = http.client.HTTPConnection(host, port, timeout=CONNECT_S)
        try:
            conn.connect()
            conn.sock.settimeout(GENERATION_S)
            conn.request("POST", "/batch", body=body, headers={"Content-Type": "application/octet-stream"})
            answer = conn.getresponse()
            data = answer.read(rollout_wire.MAX_BATCH_BYTES + 1)
        finally:
            conn.close()
        if answer.status == 503:
            return None
        if answer.status != 200:
            try:
                doc = json.loads(data)
                line, config = str(doc.get("error") or data[:200].decode(errors="replace")), doc.get("config") is True
            except (ValueError, AttributeError):
                line, config = data[:200].decode(errors="replace"), False
            raise (ConfigError if config else WorkerFailed)(f"rollout worker {host}:{port}: {line}")
        if len(data) > rollout_wire.MAX_BATCH_BYTES:
            raise WorkerFailed(f"rollout worker {host}:{port} answered over {rollout_wire.MAX_BATCH_BYTES} bytes")
        try:
            done = rollout_wire.read_batch(data, self.device, self.expected)
        except ValueError as exc:
            raise WorkerFailed(f"rollout worker {host}:{port} answered {exc}") from None
        with self.cond:
            written = self.written
        if not n - self.max_staleness <= done.version <= written:
            raise WorkerFailed(f"rollout worker {host}:{port} answered batch {n} of version {done.version}: "
                               f"the trainer has written versions up to {written}, and batch {n} needs "
                               f">= {n - self.max_staleness}")
        return done

    # --- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop asking; a client thread blocked in a generation is left to end with the process
        (daemon), the others are joined."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for thread in self.threads:
            thread.join(timeout=CONNECT_S)
        self.loss_side.close()
