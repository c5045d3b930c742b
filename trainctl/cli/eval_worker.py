"""``trainctl eval-worker``: a long-running HTTP service that evaluates checkpoints one at a time.

Startup order matters: every usage error (token, roots, state dir in use, port taken) is found
before the socket serves anything, as one line and exit code 2. The bound address is written
to ``STATE/address`` and printed on stdout, so ``--port 0`` can be discovered.

The limits (per job, queue, retention, connections) are :class:`trainctl.remote.policy.Limits`;
docs/security.md says what each one defends against.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

import click

from trainctl.kernel.errors import ConfigError
from trainctl.remote.policy import Limits

DEFAULTS = Limits()  # one place for the limits' defaults: the dataclass

DEFAULT_PORT = 8477
ACCEPT_BATCH = 32


def register(cli: click.Group) -> None:
    cli.add_command(eval_worker)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "trainctl" / "eval-worker"


@click.command(name="eval-worker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; non-loopback needs --token.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535), help="0 = any free port.")
@click.option("--token", envvar="TRAINCTL_EVAL_TOKEN", default="", show_default=False,
              help="Bearer token required from clients (or TRAINCTL_EVAL_TOKEN).")
@click.option("--root", "roots", multiple=True, type=click.Path(path_type=Path),
              help="Only read checkpoints under this directory (repeatable; default: the current directory).")
@click.option("--state", "state_dir", type=click.Path(path_type=Path), help="Job queue directory [default: ~/.local/state/trainctl/eval-worker].")
@click.option("--device", help="Evaluate on this device instead of each run's train.device.")
@click.option("--job-timeout", default=DEFAULTS.job_timeout_s, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds one evaluation may take; then it is stopped and the job is an error.")
@click.option("--max-attempts", default=DEFAULTS.max_attempts, show_default=True, type=click.IntRange(1),
              help="Evaluations of a job whose process died (or whose worker died) before the job is an error.")
@click.option("--max-eval-steps", default=DEFAULTS.max_eval_steps, show_default=True, type=click.IntRange(1),
              help="The most train.eval_steps a checkpoint's config may ask for.")
@click.option("--max-batch-size", default=DEFAULTS.max_batch_size, show_default=True, type=click.IntRange(1),
              help="The most train.batch_size a checkpoint's config may ask for.")
@click.option("--max-checkpoint-gb", default=DEFAULTS.max_checkpoint_gb, show_default=True, type=click.FloatRange(0, min_open=True),
              help="The most a checkpoint may hold: it is copied into the state dir to be evaluated.")
@click.option("--max-queue", default=DEFAULTS.max_queue, show_default=True, type=click.IntRange(1),
              help="Queued jobs; more submissions are answered 429.")
@click.option("--keep-finished", default=DEFAULTS.keep_finished, show_default=True, type=click.IntRange(1),
              help="Finished jobs remembered (the oldest are forgotten first).")
@click.option("--keep-days", default=DEFAULTS.keep_days, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Finished jobs are forgotten after this many days.")
@click.option("--request-timeout", default=DEFAULTS.request_timeout_s, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds a client has to send a request's headers, and again its body.")
@click.option("--max-connections", default=DEFAULTS.max_connections, show_default=True, type=click.IntRange(1),
              help="Open connections; the oldest one without a request is closed first.")
def eval_worker(host: str, port: int, token: str, roots: tuple[Path, ...], state_dir: Path | None, device: str | None,
                job_timeout: float, max_attempts: int, max_eval_steps: int, max_batch_size: int,
                max_checkpoint_gb: float, max_queue: int,
                keep_finished: int, keep_days: float, request_timeout: float, max_connections: int) -> None:
    """Serve remote evaluation: POST /jobs, GET /jobs/ID, GET /jobs?run=RUN, GET /health."""
    from trainctl.remote.roots import Roots

    if token and click.get_current_context().get_parameter_source("token").name == "COMMANDLINE":
        click.echo("eval-worker: warning: --token on the command line is visible to every local user (ps); "
                   "set TRAINCTL_EVAL_TOKEN instead", err=True)
    limits = Limits(job_timeout_s=job_timeout, max_attempts=max_attempts, max_eval_steps=max_eval_steps,
                    max_batch_size=max_batch_size, max_checkpoint_gb=max_checkpoint_gb, max_queue=max_queue,
                    keep_finished=keep_finished, keep_days=keep_days, request_timeout_s=request_timeout,
                    max_connections=_connection_cap(max_connections))
    if not token and not is_loopback(host):
        raise ConfigError(f"--host {host} is not a loopback address: set --token or TRAINCTL_EVAL_TOKEN so that only your clients can submit jobs")
    allowed = Roots(list(roots) or [Path.cwd()])
    state = state_dir or default_state_dir()
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the state dir {state} ({exc.strerror}); choose another with --state DIR") from None
    lock = _lock(state)  # noqa: F841  (held for the life of the process)
    sock = bind(host, port)

    try:
        import uvicorn

        from trainctl.remote.app import WorkerAPI
    except ImportError as exc:
        raise ConfigError(f"eval-worker needs a package that is missing ({exc.name}): pip install 'trainctl[eval]'") from None
    from trainctl.remote.connections import limited_protocol
    from trainctl.remote.jobs import JobStore
    from trainctl.remote.worker import EvalThread, log

    store = JobStore(state, max_attempts=max_attempts, max_queue=max_queue, keep_finished=keep_finished,
                     keep_s=keep_days * 86400)
    thread = EvalThread(store, allowed, work_dir=state / "work", device=device, limits=limits)
    thread.start()
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    address = f"http://{shown}:{bound_port}"
    (state / "address.tmp").write_text(address + "\n")
    os.replace(state / "address.tmp", state / "address")
    counts = store.counts()
    click.echo(f"eval-worker: listening on {address} | roots {allowed} | state {state} | "
               f"{counts['queued']} queued ({store.requeued} requeued after a restart), {counts['done'] + counts['error']} finished"
               f"{'' if token else ' | no token: loopback only'}")
    config = uvicorn.Config(
        WorkerAPI(store, allowed, token=token, body_timeout_s=request_timeout).app(), log_level="warning",
        access_log=False, lifespan="off", server_header=False, timeout_graceful_shutdown=2,
        http=limited_protocol(request_timeout, limits.max_connections), timeout_keep_alive=5,
        limit_concurrency=limits.max_connections + ACCEPT_BATCH + 8, h11_max_incomplete_event_size=16 * 1024,
        backlog=ACCEPT_BATCH,  # asyncio accepts up to this many at once, before any can be turned away
    )
    # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that
    # was installed before it: make that one a clean exit, so the last line below is printed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        thread.stopping.set()
        log("stopped" + (f"; job {thread.current} runs again at the next start" if thread.current else ""))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it could resolve anywhere


def _connection_cap(wanted: int) -> int:
    """``wanted``, or fewer when the open-file limit would not hold that many sockets beside the
    worker's own files (else accept() fails and even /health goes unanswered)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # what the worker holds itself (~15: logs, pipes, the job files) and one accept batch
    room = soft - 32 - ACCEPT_BATCH if soft != resource.RLIM_INFINITY else wanted
    if room < 4:
        raise ConfigError(f"the open-file limit ({soft}) is too low to serve; raise it (ulimit -n 1024)")
    return min(wanted, room)


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: cannot resolve ({exc.strerror}); give an IP address") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another with --port (0 = any free port)") from None
    sock.listen(ACCEPT_BATCH)  # connections queue from here on, before the server loop starts
    return sock


def _lock(state: Path):
    import fcntl

    f = open(state / "lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(f"another eval-worker is using {state}; stop it or give this one another --state DIR") from None
    return f
