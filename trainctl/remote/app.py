"""The eval worker's HTTP API (Starlette, served by uvicorn).

    GET  /health            {"status": "ok"}; no token needed
    POST /jobs              {"run", "checkpoint", "step", "evaluate"?} -> the job (201 new, 200 existing)
    GET  /jobs?run=RUN      {"jobs": [...]}, oldest first (the newest ``limit``, default 100)
    GET  /jobs/ID           the job: status queued|running|done|error, result or error

Every answer is JSON; every error is ``{"error": "one line"}`` with a 4xx status: 400 bad JSON or
fields (nested too deep, control characters), 401 missing or wrong bearer token, 403 checkpoint
outside the roots, 404 unknown job or endpoint, 405 wrong method, 408 body not sent in time, 413
body over the limit, 422 checkpoint that does not exist, 429 queue full (``Retry-After``). One log
line per request goes to stderr, with control characters escaped.

Why Starlette + uvicorn: both are maintained, widely deployed and small (together they add
``starlette``, ``anyio``, ``uvicorn`` and ``h11``). uvicorn parses HTTP/1.1 (keep-alive, chunked
bodies, malformed requests) and handles SIGINT/SIGTERM for a graceful stop; Starlette gives
routing, 404/405 and exception handling. The stdlib ``http.server`` would leave request
parsing limits, body streaming and shutdown to us, and its documentation says it is not meant
for production; Werkzeug's server says the same of itself.
"""

from __future__ import annotations

import hmac
import json
import sys
import time
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from trainctl.evaluation import SampleRequest
from trainctl.remote.jobs import JobStore, QueueFull
from trainctl.remote.roots import Roots
from trainctl.remote.worker import escape

MAX_BODY = 64 * 1024
FIELDS = ("run", "checkpoint", "step", "evaluate")
REQUIRED = ("run", "checkpoint", "step")


class WorkerAPI:
    def __init__(self, store: JobStore, roots: Roots, *, token: str = "", max_body: int = MAX_BODY,
                 body_timeout_s: float = 10.0) -> None:
        self.store, self.roots, self.token, self.max_body = store, roots, token, max_body
        self.body_timeout_s = body_timeout_s

    def app(self) -> Any:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/jobs", self.submit, methods=["POST"]),
            Route("/jobs", self.list_jobs, methods=["GET"]),
            Route("/jobs/{job_id}", self.get_job, methods=["GET"]),
        ]
        handlers = {HTTPException: _http_error, Exception: _internal_error}
        return AccessLog(Starlette(routes=routes, exception_handlers=handlers))  # type: ignore[arg-type]

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def submit(self, request: Request) -> JSONResponse:
        self._authorize(request)
        fields = parse_submission(await self._read_json(request))
        path = self.roots.resolve(fields["checkpoint"])
        if path is None:
            raise HTTPException(403, f"checkpoint {fields['checkpoint']} is outside the worker's roots ({self.roots})")
        if not path.is_dir():
            raise HTTPException(422, f"checkpoint {fields['checkpoint']} does not exist or is not a directory")
        try:
            job, created = self.store.submit(path=str(path), **fields)
        except QueueFull as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "30"}) from None
        return JSONResponse(job.to_dict(), status_code=201 if created else 200)

    async def list_jobs(self, request: Request) -> JSONResponse:
        self._authorize(request)
        run, limit = request.query_params.get("run"), request.query_params.get("limit", "100")
        if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 1000:  # isdigit alone takes "²"
            raise HTTPException(400, "limit must be an integer from 1 to 1000")
        return JSONResponse({"jobs": [j.to_dict() for j in self.store.list(run, int(limit))]})

    async def get_job(self, request: Request) -> JSONResponse:
        self._authorize(request)
        job = self.store.get(request.path_params["job_id"])
        if job is None:
            raise HTTPException(404, f"no job {request.path_params['job_id']!r}; list them with GET /jobs?run=RUN")
        return JSONResponse(job.to_dict())

    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    async def _read_json(self, request: Request) -> Any:
        too_large = HTTPException(413, f"body over {self.max_body} bytes")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise too_large
        body = bytearray()
        try:
            with anyio.fail_after(self.body_timeout_s):  # a client trickling its body holds a connection
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > self.max_body:
                        raise too_large
        except TimeoutError:
            raise HTTPException(408, f"the body was not sent within {self.body_timeout_s:g}s") from None
        try:
            return json.loads(body)
        except RecursionError:
            raise HTTPException(400, "body is nested too deeply") from None
        except ValueError as exc:  # also UnicodeDecodeError
            raise HTTPException(400, f"body is not valid JSON ({exc})") from None


def parse_submission(data: Any) -> dict[str, Any]:
    """The fields of a job submission, checked; HTTP 400 naming the first problem."""
    def bad(message: str) -> HTTPException:
        return HTTPException(400, message)

    if not isinstance(data, dict):
        raise bad("the body must be a JSON object: {\"run\", \"checkpoint\", \"step\", \"evaluate\"}")
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise bad(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    run, checkpoint, step = data["run"], data["checkpoint"], data["step"]
    lone = _lone_surrogate(data)
    if lone:  # stored, it would make every listing that holds the job unrenderable
        raise bad(f"{lone} holds a lone UTF-16 surrogate, which is not text; send valid Unicode")
    if not isinstance(run, str) or not 0 < len(run) <= 200 or not run.isprintable():
        raise bad("run must be a non-empty string of at most 200 printable characters")
    if not isinstance(checkpoint, str) or not checkpoint.startswith("/") or len(checkpoint) > 4096 \
            or "\0" in checkpoint:
        raise bad("checkpoint must be an absolute path (at most 4096 characters, no NUL)")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad("step must be a non-negative integer")
    what = data.get("evaluate", {"val_loss": True})
    if not isinstance(what, dict) or any(k not in ("val_loss", "samples") for k in what):
        raise bad("evaluate must be an object with val_loss (bool) and/or samples ({prompts, max_new_tokens})")
    val_loss = what.get("val_loss", True)
    if not isinstance(val_loss, bool):
        raise bad("evaluate.val_loss must be true or false")
    samples = what.get("samples")
    if samples is not None:
        if not isinstance(samples, dict) or not isinstance(samples.get("prompts"), list) \
                or not all(isinstance(p, str) and len(p) <= 1000 for p in samples["prompts"]):
            raise bad("evaluate.samples must be {\"prompts\": [strings of at most 1000 characters], ...}")
        try:
            SampleRequest(**{**samples, "prompts": tuple(samples["prompts"])})
        except (TypeError, ValueError) as exc:
            raise bad(f"evaluate.samples: {exc}") from None
    if not val_loss and samples is None:
        raise bad("evaluate asks for nothing: set val_loss true or give samples")
    return {"run": run, "checkpoint": checkpoint, "step": step,
            "evaluate": {"val_loss": val_loss, **({"samples": samples} if samples else {})}}


def _lone_surrogate(value: Any, where: str = "the body") -> str | None:
    """The first field (``evaluate.samples.prompts[0]``) whose text cannot be UTF-8, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, where) or _lone_surrogate(item, key if where == "the body" else f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{where}[{i}]")
            if found:
                return found
    return None


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404 and message == "Not Found":
        message = f"no endpoint {request.url.path}; see GET /health, POST /jobs, GET /jobs, GET /jobs/ID"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    where = f"{request.method} {escape(request.url.path)}"
    print(f"eval-worker: internal error on {where}: {type(exc).__name__}: {escape(str(exc))}",
          file=sys.stderr, flush=True)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


class AccessLog:
    """ASGI middleware: one line per request, ``eval-worker: CLIENT METHOD PATH STATUS MS``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            client = scope.get("client") or ("-", 0)
            query = f"?{scope['query_string'].decode(errors='replace')}" if scope.get("query_string") else ""
            print(f"eval-worker: {client[0]} {scope['method']} {escape(scope['path'] + query)} {status[0] or 500} "
                  f"{(time.perf_counter() - started) * 1000:.1f}ms", file=sys.stderr, flush=True)
