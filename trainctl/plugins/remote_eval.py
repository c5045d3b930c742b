"""Remote evaluation: every saved checkpoint (or every N steps) is evaluated by a
``trainctl eval-worker`` while training goes on, and the results come back as eval events.

On ``checkpoint_saved`` the plugin writes a submission into its durable outbox (a small file in
the run directory) and returns; a background thread sends it, retrying with capped exponential
backoff while the worker is down, slow or restarting, and polls for results. Each result is
emitted as ``EvalEnd(step=<the checkpoint's step>, source="remote")`` for ``train`` and ``val``
with ``metrics["perplexity"]``, so every logger shows it; generated samples arrive as a
``remote_eval_samples`` notice. The training thread never waits on the network, except at the
end of the run for ``wait_at_end_s``; what is still open then is reported
(``remote_eval_pending``) and sent again when the run resumes: the open submissions are also
part of the checkpointed plugin state.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from trainctl.hooks import Every, PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import CheckpointSaved, EvalEnd, Notice, RunEnd, RunStart
from trainctl.kernel.secrets import secret
from trainctl.remote.client import Rejected, Unavailable, WorkerClient
from trainctl.remote.outbox import Outbox, Submission


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    url: str = "http://127.0.0.1:8477"
    token: str = secret()  # saved empty in checkpoints; prefer token_env
    token_env: str = "TRAINCTL_EVAL_TOKEN"  # read when token is empty
    every: int = 0  # only checkpoints at multiples of this step (and the last one); 0 = all
    val_loss: bool = True
    prompts: tuple[str, ...] = ()  # also generate from these fixed prompts
    max_new_tokens: int = 100
    timeout_s: float = 5.0  # per HTTP request
    poll_s: float = 2.0  # between result polls
    backoff_max_s: float = 30.0  # retry delay cap while the worker is unreachable
    wait_at_end_s: float = 5.0  # at the end of the run, wait this long for open results
    run_id: str = ""  # default: the run name and 16 random hex digits, kept across resumes

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://, e.g. http://127.0.0.1:8477")
        if self.every < 0 or self.max_new_tokens < 1:
            raise ValueError("every must be 0 or more and max_new_tokens at least 1")
        if min(self.timeout_s, self.poll_s, self.backoff_max_s) <= 0 or self.wait_at_end_s < 0:
            raise ValueError("timeout_s, poll_s and backoff_max_s must be positive, wait_at_end_s 0 or more")
        if not self.val_loss and not self.prompts:
            raise ValueError("nothing to evaluate: set val_loss = true or give prompts")


class RemoteEval:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config, self.run = config, run
        self.enabled = run.is_main  # one submission per checkpoint, from rank 0
        self.dir = run.out_dir / "remote_eval" / "outbox"
        self.outbox = Outbox(self.dir)
        self.client = WorkerClient(config.url, token=config.token or os.environ.get(config.token_env, ""),
                                   timeout=config.timeout_s)
        # random: a run id another submitter can work out (a hash of the run directory was) lets them file its jobs first
        self.run_id = config.run_id or f"{run.run_name}-{secrets.token_hex(8)}"
        self.what: dict[str, Any] = {"val_loss": config.val_loss}
        if config.prompts:
            self.what["samples"] = {"prompts": list(config.prompts), "max_new_tokens": config.max_new_tokens}
        self.thread: threading.Thread | None = None
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.hurry = False  # at the end: poll often
        self.down: str | None = None  # why the worker is unreachable, reported once per outage
        self.step = 0  # the newest step we know of, for notices
        self.every = Every(config.every or 1)  # every = 0: every checkpoint

    # --- hooks (training thread): file I/O only ---------------------------------------------

    @hookimpl
    def trainctl_check_config(self, config: dict[str, Any]) -> list[str]:
        if "checkpoint" not in config["plugins"]:
            return ['plugin remote_eval evaluates checkpoints: add "checkpoint" to plugins = [...]']
        return []

    @hookimpl
    def trainctl_load_state_dict(self, states: dict[str, Any]) -> None:
        saved = states.get("remote_eval", {}).get("run_id")
        if not self.config.run_id and isinstance(saved, str) and saved:
            self.run_id = saved  # a resumed run is the same run to the worker
        for item in states.get("remote_eval", {}).get("open", []):
            if self.enabled:  # the outbox directory may be gone (run dir copied): restore it
                self.outbox.add(Submission(**{**item, "status": "pending", "job": None}))

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        if not self.enabled:
            return
        self.step = event.start_step
        # the checkpoint we resumed from was saved after its own plugin state was written
        if event.resumed_from and self._due(event.start_step):
            self.outbox.add(Submission(step=event.start_step, checkpoint=os.path.abspath(event.resumed_from)))
        self.thread = threading.Thread(target=self._send_loop, name="remote_eval", daemon=True)
        self.thread.start()

    @hookimpl
    def trainctl_checkpoint_saved(self, event: CheckpointSaved) -> None:
        self.step = event.step
        if self.enabled and self._due(event.step):
            self.outbox.add(Submission(step=event.step, checkpoint=os.path.abspath(event.path)))
            self.wake.set()

    @hookimpl
    def trainctl_state_dict(self) -> dict[str, Any]:
        return {"remote_eval": {"run_id": self.run_id, "open": [s.to_dict() for s in self.outbox.open()]}}

    @hookimpl(tryfirst=True)  # results that arrive while we wait still reach every logger
    def trainctl_run_end(self, event: RunEnd) -> None:
        if self.thread is None:
            return
        self.hurry = True
        self.wake.set()
        deadline = time.monotonic() + self.config.wait_at_end_s
        while self.outbox.open() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=1.0)
        still = self.outbox.open()
        if still:
            steps = [s.step for s in still]
            message = (f"{len(still)} remote evaluation(s) still open (steps {steps}); they stay in {self.dir} "
                       "and are sent again when this run resumes")
            print(f"trainctl: remote_eval: {message}", file=sys.stderr, flush=True)
            self.run.emit(Notice(step=event.step, kind=notices.REMOTE_EVAL_PENDING, message=message,
                                 data={"steps": steps, "outbox": str(self.dir)}, time=time.time()))

    def _due(self, step: int) -> bool:
        return self.every.due(step, self.run.max_steps)

    # --- the sender thread: never calls hooks, only run.emit --------------------------------

    def _send_loop(self) -> None:
        delay = 0.0
        while not self.stopping.is_set():
            try:
                self._round()
                if self.down is not None:
                    self._say(f"worker {self.config.url} reachable again", notices.REMOTE_EVAL_REACHABLE)
                    self.down = None
                delay = 0.0
            except Unavailable as exc:
                delay = min(self.config.backoff_max_s, max(0.25, delay * 2))
                if self.down is None:
                    self.down = str(exc)
                    self._say(f"worker {self.config.url} unavailable ({exc}); retrying with backoff up to "
                              f"{self.config.backoff_max_s:g}s, submissions kept in {self.dir}", notices.REMOTE_EVAL_UNAVAILABLE)
            except Exception as exc:  # a bug here must not end the thread silently
                delay = self.config.backoff_max_s
                self._say(f"unexpected {type(exc).__name__}: {exc}", notices.REMOTE_EVAL_ERROR)
            self.wake.wait(delay or (0.2 if self.hurry else self.config.poll_s))
            self.wake.clear()

    def _round(self) -> None:
        """Send what is pending, then collect what the worker finished. Raises Unavailable."""
        open_subs = self.outbox.open()
        for sub in (s for s in open_subs if s.status == "pending"):
            try:
                job = self.client.submit(run=self.run_id, checkpoint=sub.checkpoint, step=sub.step, evaluate=self.what)
            except Rejected as exc:
                sub.status, sub.error = "rejected", str(exc)
                self.outbox.update(sub)
                self._say(f"step {sub.step} rejected by the worker: {exc}", notices.REMOTE_EVAL_ERROR, sub.step)
                continue
            sub.status, sub.job = "submitted", job["id"]
            self.outbox.update(sub)
            self._collect(sub, job)
        for sub in (s for s in self.outbox.open() if s.status == "submitted"):
            try:
                job = self.client.job(sub.job or "")
            except Rejected:  # 404: the worker lost its state; submit again
                sub.status, sub.job = "pending", None
                self.outbox.update(sub)
                continue
            self._collect(sub, job)

    def _collect(self, sub: Submission, job: dict[str, Any]) -> None:
        # Events first, then the outbox: once a submission is closed its events are queued (the
        # end-of-run wait relies on it); a crash in between re-polls it (at least once, never lost).
        if job["status"] == "error":
            sub.status, sub.error = "error", job.get("error")
            self._say(f"evaluation of step {sub.step} failed on the worker: {sub.error}", notices.REMOTE_EVAL_ERROR, sub.step)
            self.outbox.update(sub)
        elif job["status"] == "done":
            result = job["result"]
            sub.status, sub.result = "done", result
            for split, prefix in (("train", "train_"), ("val", "")):
                if result.get(f"{split}_loss") is not None:
                    metrics = {name: result[f"{prefix}{name}"] for name in ("perplexity", "accuracy")
                               if result.get(f"{prefix}{name}") is not None}
                    self.run.emit(EvalEnd(step=sub.step, split=split, loss=result[f"{split}_loss"], source="remote",
                                          loss_mean=result.get("loss_mean", "tokens"),
                                          duration=result.get("duration", 0.0), metrics=metrics, time=time.time()))
            if result.get("samples"):
                self.run.emit(Notice(step=sub.step, kind=notices.REMOTE_EVAL_SAMPLES,
                                     message=f"{len(result['samples'])} sample(s) from the checkpoint at step {sub.step}",
                                     data={"samples": result["samples"]}, time=time.time()))
            self.outbox.update(sub)

    def _say(self, message: str, kind: str, step: int | None = None) -> None:
        print(f"trainctl: remote_eval: {message}", file=sys.stderr, flush=True)
        self.run.emit(Notice(step=self.step if step is None else step, kind=kind, message=message, time=time.time()))


SPEC = PluginSpec(name="remote_eval", factory=RemoteEval, config=Config,
                  description="Sends checkpoints to a trainctl eval-worker; its results come back as eval events.")
