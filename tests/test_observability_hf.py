"""The observability plugins see only kernel events: the same set works on the ``hf`` backend
(tiny random Llama). Final metrics are checked through the Pushgateway push."""

from __future__ import annotations

import csv
import http.server
import json
import threading

from tests.conftest import make_config
from tests.test_prometheus import Gateway, parse, value
from trainctl.kernel.run import Run


def test_metrics_samples_layer_stats_and_loggers_on_hf(registry, hf, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Gateway.requests = []
    out = tmp_path / "out"
    try:
        config = make_config(registry, out, *hf.sets(None, "train.max_steps=4", "train.eval_interval=2",
                                                     "train.log_interval=2"),
                             'plugins=["prometheus", "samples", "layer_stats", "jsonl", "csv", "tensorboard"]',
                             "plugin.prometheus.port=0", "train.run_name='hf-obs'",
                             f"plugin.prometheus.pushgateway='http://127.0.0.1:{server.server_port}'",
                             "plugin.samples.every=2", "plugin.samples.max_new_tokens=8",
                             'plugin.samples.prompts=["Hello"]', "plugin.layer_stats.every=2", backend="hf")
        assert Run(config, registry, resume="never").fit().status == "completed"
    finally:
        server.shutdown()
        server.server_close()
    [(_, path, body)] = Gateway.requests
    samples = parse(body)
    labels = {"run": "hf-obs", "backend": "hf", "rank": "0"}
    assert value(samples, "trainctl_step", **labels) == 4
    assert value(samples, "trainctl_step_duration_seconds_count") == 4
    assert value(samples, "trainctl_eval_loss", split="val", source="local") > 0
    assert value(samples, "trainctl_layer_grad_norm", layer="layer.0") > 0
    assert value(samples, "trainctl_run_state", state="completed") == 1
    # the backend's own metrics, by name, with no hf-specific code in the plugin
    assert 0 < value(samples, "trainctl_step_metric", name="mean_token_accuracy") <= 1
    assert value(samples, "trainctl_step_metric", name="entropy") > 0
    assert 0 <= value(samples, "trainctl_eval_metric", split="val", source="local", name="accuracy") <= 1

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    announcements = ("metrics", "evaluating", "saving")
    notices = [(e["kind"], e["step"]) for e in events if e["event"] == "notice" and e["kind"] not in announcements]
    assert notices == [("samples", 2), ("layer_stats", 2), ("samples", 4), ("layer_stats", 4)]
    sample = next(e for e in events if e.get("kind") == "samples")
    assert sample["data"]["prompts"] == ["Hello"] and isinstance(sample["data"]["texts"][0], str)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2", "4"] and rows[0]["eval_val_loss"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
