"""The eval worker's API from the run's side, over plain ``urllib`` (a client needs no more).

Every failure is one of two exceptions, so the caller can decide without parsing messages:
:class:`Unavailable` (down, slow, restarting, 5xx, or a credential the worker refused: try
again later) and :class:`Rejected` (this submission can never succeed as it is).

Redirects are never followed: urllib would repeat the request, ``Authorization`` header
included, to whatever host the answer names. A 3xx is an :class:`Unavailable` that names its
``Location``, so the user can fix the URL.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

#: Answers that mean "this request is wrong and will stay wrong"; anything else may pass later
#: (401/403: a token or root the worker's operator can fix; 408/429/5xx: a busy or broken worker).
PERMANENT = frozenset({400, 404, 405, 413, 422})


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Leaves every 3xx as the HTTPError it is, instead of following it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def no_redirect_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(NoRedirects)


def redirect_message(exc: urllib.error.HTTPError) -> str:
    location = exc.headers.get("Location", "?")
    return f"HTTP {exc.code} redirect to {location!r}, not followed; set the URL to where it should go"


class WorkerError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unavailable(WorkerError):
    """Try again later."""


class Rejected(WorkerError):
    """The worker refused this request for good (its message says why)."""


class WorkerClient:
    def __init__(self, url: str, *, token: str = "", timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.opener = no_redirect_opener()

    def submit(self, *, run: str, checkpoint: str, step: int, evaluate: dict[str, Any]) -> dict[str, Any]:
        """The job (new, or the existing one for this checkpoint of this run)."""
        return self._request("POST", "/jobs", {"run": run, "checkpoint": checkpoint, "step": step, "evaluate": evaluate})

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{quote(job_id, safe='')}")

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise Unavailable(f"{method} {path}: {redirect_message(exc)}", exc.code) from None
            message = _error_message(exc)
            kind = Rejected if exc.code in PERMANENT else Unavailable
            raise kind(f"{method} {path}: HTTP {exc.code}: {message}", exc.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise Unavailable(f"{method} {path}: {type(exc).__name__}: {reason}") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except (OSError, ValueError, AttributeError):
        return str(exc.reason)
