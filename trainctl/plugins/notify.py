"""Notify a webhook when the run ends (completed, stopped or failed).

The body is a short JSON summary with a Slack-compatible ``text`` field (also accepted by
Mattermost, Discord's ``/slack`` endpoint and most chat webhooks) beside the plain fields:
status, step, losses, duration, run dir, reason. Sending is bounded by ``timeout_s`` in total;
a failure is one stderr line and a ``notify_failed`` notice, and never changes how the run
ended. Webhook URLs are secrets: ``url`` is saved empty in checkpoints (prefer ``url_env``).
Redirects are not followed (a 3xx is a failure naming its ``Location``): the body would go to
another host, and a redirect to a login page would count as delivered.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal

from trainctl.hooks import PluginSpec, RunInfo, hookimpl, notices
from trainctl.hooks.events import Notice, RunEnd, RunStart
from trainctl.kernel.secrets import secret
from trainctl.remote.client import no_redirect_opener, redirect_message


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    url: str = secret()  # the webhook; empty: read it from the environment variable url_env
    url_env: str = "TRAINCTL_NOTIFY_URL"
    timeout_s: float = 5.0  # the whole POST, connect to answer
    on: tuple[Literal["completed", "stopped", "failed"], ...] = ("completed", "stopped", "failed")

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s <= 60:
            raise ValueError("timeout_s must be in (0, 60]")


def summary(event: RunEnd, run: RunInfo, *, max_steps: int, backend: str) -> dict[str, Any]:
    """The webhook body: plain fields and a one-line ``text`` for chat webhooks."""
    def loss(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None

    losses = ", ".join(f"{name} loss {value:.4f}" for name, value in
                       (("train", loss(event.train_loss)), ("val", loss(event.val_loss))) if value is not None)
    minutes, seconds = divmod(int(event.duration), 60)
    text = (f"trainctl run '{run.run_name}' {event.status} at step {event.step}/{max_steps} after "
            f"{minutes}m{seconds:02d}s" + (f": {losses}" if losses else "")
            + (f" ({event.reason})" if event.reason else "") + f" | {run.out_dir} on {socket.gethostname()}")
    return {
        "text": text, "run": run.run_name, "status": event.status, "step": event.step, "max_steps": max_steps,
        "tokens": event.tokens, "duration_s": round(event.duration, 3), "train_loss": loss(event.train_loss),
        "val_loss": loss(event.val_loss), "reason": event.reason, "out_dir": os.path.abspath(run.out_dir),
        "backend": backend, "host": socket.gethostname(),
    }


class Notify:
    def __init__(self, config: Config, run: RunInfo) -> None:
        self.config, self.run = config, run
        self.url = config.url or os.environ.get(config.url_env, "")
        self.backend = run.backend

    @hookimpl
    def trainctl_check_config(self, config: dict[str, Any]) -> list[str]:
        if not self.url:
            return [f"plugin.notify needs a webhook: set plugin.notify.url or the {self.config.url_env} environment variable"]
        if not self.url.startswith(("http://", "https://")):
            return ["plugin.notify.url must start with http:// or https://"]
        return []

    @hookimpl
    def trainctl_run_start(self, event: RunStart) -> None:
        self.backend = event.backend

    @hookimpl(tryfirst=True)  # a failure notice still reaches the loggers
    def trainctl_run_end(self, event: RunEnd) -> None:
        if not self.run.is_main or event.status not in self.config.on:
            return
        body = summary(event, self.run, max_steps=self.run.max_steps, backend=self.backend)
        error = self.post(body)
        if error:
            message = f"could not notify the webhook: {error}; the run itself {event.status}"
            print(f"trainctl: notify: {message}", file=sys.stderr, flush=True)
            self.run.emit(Notice(step=event.step, kind=notices.NOTIFY_FAILED, message=message, time=time.time()))

    def post(self, body: dict[str, Any]) -> str | None:
        """POST the body; None on a 2xx answer, else what went wrong. Never longer than timeout_s:
        urllib's timeout bounds each socket operation, not the whole exchange, so the request
        runs in a daemon thread that is abandoned when the time is up."""
        outcome: list[str | None] = []

        def send() -> None:
            request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json", "User-Agent": "trainctl"})
            try:
                with no_redirect_opener().open(request, timeout=self.config.timeout_s) as response:
                    response.read(4096)
                outcome.append(None)
            except urllib.error.HTTPError as exc:
                outcome.append(redirect_message(exc) if 300 <= exc.code < 400 else f"HTTP {exc.code} {exc.reason}")
            except Exception as exc:  # anything: a notifier must never break the run's end
                outcome.append(f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}")

        thread = threading.Thread(target=send, name="notify", daemon=True)
        thread.start()
        thread.join(self.config.timeout_s)
        return outcome[0] if outcome else f"no answer within {self.config.timeout_s:g}s"


SPEC = PluginSpec(name="notify", factory=Notify, config=Config,
                  description="POSTs a JSON summary (with a Slack-compatible text) to a webhook when the run ends.")
