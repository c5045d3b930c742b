"""The ``notify`` plugin against a real HTTP receiver on loopback, a dead URL and a receiver
that never answers; the kernel's fake backend keeps the runs fast."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from tests.conftest import make_config
from tests.worker_process import events, free_port
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.run import Run

PLUGINS = 'plugins=["checkpoint", "notify", "console", "jsonl"]'


class Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[dict] = []
    delay = 0.0

    def do_POST(self) -> None:
        time.sleep(Receiver.delay)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.bodies.append({"json": json.loads(body), "type": self.headers["Content-Type"]})
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver():
    Receiver.bodies, Receiver.delay = [], 0.0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()


def fit(registry, out, *overrides, fail_at=None):
    session = Run(make_config(registry, out, PLUGINS, "train.max_steps=6", "train.eval_interval=3", *overrides),
                  registry, resume="never")
    session.backend.fail_at = fail_at
    return session.fit()


def test_completed_run_posts_a_summary(registry, tmp_path, receiver):
    result = fit(registry, tmp_path / "out", f"plugin.notify.url='{receiver}'", "train.run_name='nightly'")
    assert result.status == "completed"
    [post] = Receiver.bodies
    body = post["json"]
    assert post["type"] == "application/json"
    assert body["status"] == "completed" and body["step"] == 6 and body["max_steps"] == 6
    assert body["val_loss"] == pytest.approx(2.0 / 7) and body["train_loss"] == pytest.approx(10.0 / 6)
    assert body["out_dir"] == str((tmp_path / "out").resolve()) and body["run"] == "nightly" and body["backend"] == "fake"
    assert body["duration_s"] >= 0 and body["reason"] == ""
    assert body["text"].startswith("trainctl run 'nightly' completed at step 6/6") and "val loss 0.2857" in body["text"]


def test_failed_run_is_notified_with_its_reason(registry, tmp_path, receiver):
    result = fit(registry, tmp_path / "out", f"plugin.notify.url='{receiver}'", fail_at=3)
    assert result.status == "failed"
    body = Receiver.bodies[0]["json"]
    assert body["status"] == "failed" and body["step"] == 3 and body["reason"] == "RuntimeError: boom"
    assert "failed at step 3/6" in body["text"] and "(RuntimeError: boom)" in body["text"]


def test_stopped_run_is_notified(registry, tmp_path, receiver):
    session = Run(make_config(registry, tmp_path / "out", 'plugins=["checkpoint", "script", "notify", "jsonl"]',
                              "train.max_steps=6", "plugin.script.stop_at=[2]", "plugin.script.reason='signal'",
                              f"plugin.notify.url='{receiver}'"), registry, resume="never")
    assert session.fit().status == "stopped"
    body = Receiver.bodies[0]["json"]
    assert body["status"] == "stopped" and body["step"] == 2 and body["reason"] == "signal"
    assert "stopped at step 2/6" in body["text"]


def test_statuses_not_listed_in_on_are_not_notified(registry, tmp_path, receiver):
    fit(registry, tmp_path / "out", f"plugin.notify.url='{receiver}'", "plugin.notify.on=['failed']")
    assert Receiver.bodies == []


def test_dead_url_is_reported_and_the_run_still_completes(registry, tmp_path, capsys):
    out = tmp_path / "out"
    result = fit(registry, out, f"plugin.notify.url='http://127.0.0.1:{free_port()}/hook'")
    assert result.status == "completed"
    err = capsys.readouterr().err
    assert err.count("trainctl: notify: could not notify the webhook") == 1 and "Connection refused" in err
    log = events(out)
    # emitted from run_end, the notice still reaches the loggers, before their own run_end
    assert [e["event"] for e in log[-2:]] == ["notice", "run_end"]
    assert log[-2]["kind"] == "notify_failed" and log[-1]["status"] == "completed"


def test_a_receiver_that_never_answers_costs_at_most_the_timeout(registry, tmp_path, receiver, capsys):
    Receiver.delay = 5.0
    started = time.monotonic()
    result = fit(registry, tmp_path / "out", f"plugin.notify.url='{receiver}'", "plugin.notify.timeout_s=0.5")
    assert result.status == "completed" and time.monotonic() - started < 4.0
    assert "could not notify the webhook" in capsys.readouterr().err


def test_a_webhook_is_required(registry, tmp_path, monkeypatch):
    monkeypatch.delenv("TRAINCTL_NOTIFY_URL", raising=False)
    with pytest.raises(ConfigError, match="plugin.notify needs a webhook"):
        fit(registry, tmp_path / "out")
    monkeypatch.setenv("TRAINCTL_NOTIFY_URL", "file:///etc/passwd")
    with pytest.raises(ConfigError, match="must start with http"):
        fit(registry, tmp_path / "out")


class Elsewhere(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_POST(self) -> None:
        Elsewhere.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_redirect_is_a_failure_not_a_delivery(registry, tmp_path, capsys):
    """Before: notify followed a 302 to another host (the summary went there) and counted it as sent."""
    elsewhere = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{elsewhere.server_port}/stolen"

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(307)  # 307 keeps the method and body: urllib would re-POST them
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    redirecting = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=redirecting.serve_forever, daemon=True).start()
    Elsewhere.seen = []
    try:
        out = tmp_path / "out"
        result = fit(registry, out, f"plugin.notify.url='http://127.0.0.1:{redirecting.server_port}/hook'")
    finally:
        redirecting.shutdown()
        elsewhere.shutdown()
    assert result.status == "completed" and Elsewhere.seen == []
    err = capsys.readouterr().err
    assert f"could not notify the webhook: HTTP 307 redirect to '{target}', not followed" in err
    assert events(out)[-2]["kind"] == "notify_failed"


def test_the_webhook_url_is_not_saved_in_checkpoints(registry, tmp_path, receiver):
    fit(registry, tmp_path / "out", f"plugin.notify.url='{receiver}?key=s3cret'", "train.save_interval=3")
    saved = list((tmp_path / "out" / "checkpoints").glob("step-*/config.toml"))
    assert saved and all("s3cret" not in f.read_text() and f.stat().st_mode & 0o077 == 0 for f in saved)
    assert Receiver.bodies  # it was delivered all the same


def test_credential_keys_of_every_builtin_plugin_are_marked_secret():
    """A stray: a plugin that takes a token, password or key in its TOML table without marking
    it ``secret()`` would have it copied into every checkpoint."""
    import dataclasses
    import re

    from trainctl.kernel.registry import Registry
    from trainctl.kernel.secrets import secret_keys

    registry = Registry.discover(entry_points=False)
    credential = re.compile(r"(^|_)(token|password|secret|api_key|webhook)$")
    for name, spec in registry.plugins.items():
        if not dataclasses.is_dataclass(spec.config):
            continue
        keys = [f.name for f in dataclasses.fields(spec.config)]
        strays = [k for k in keys if credential.search(k) and k not in secret_keys(spec.config)]
        assert not strays, f"plugin {name}: mark {strays} with trainctl.kernel.secrets.secret()"
    assert secret_keys(registry.plugins["notify"].config) == ["url"]
    assert secret_keys(registry.plugins["remote_eval"].config) == ["token"]
