"""Eval metric plugins (``trainctl_eval_metrics``) through the real kernel on the gpt backend: a
metric reaches the eval events under the plugin's name, in events.jsonl and in Prometheus'
``trainctl_eval_metric{name}``; it equals the same metric computed from the whole split's logits at
once; with no such plugin the backend is handed nothing to call."""

from __future__ import annotations

import json

import pytest
import torch
from prometheus_client import generate_latest

from tests.conftest import TINY_GPT, make_config
from tests.test_prometheus import exporter, parse, value
from trainctl.hooks.events import EvalEnd
from trainctl.kernel.run import Run


def test_topk_accuracy_in_events_jsonl_and_prometheus(registry, tmp_path):
    out = tmp_path / "out"
    config = make_config(registry, out, *TINY_GPT, 'plugins=["topk_accuracy", "jsonl"]', "plugin.topk_accuracy.k=[1, 5]",
                         "train.max_steps=3", "train.eval_interval=0", "train.eval_steps=3", "train.threads=1",
                         backend="gpt")
    session = Run(config, registry, resume="never")
    backend = session.backend
    assert session.fit().status == "completed"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    evals = {e["split"]: e for e in events if e["event"] == "eval"}
    assert set(evals) == {"train", "val"}

    # the same metric from the split's logits all at once (what compute_metrics would hold)
    with torch.no_grad():
        backend.raw_model.eval()
        batches = list(backend._eval_batches("val"))
        logits = torch.cat([backend.eval_model(x, y)[0] for x, y in batches])  # (3B, T, V)
        targets = torch.cat([y for _, y in batches])  # (3B, T)
    top5 = (logits.topk(5, dim=-1).indices == targets.unsqueeze(-1)).any(-1).float().mean().item()
    top1 = (logits.argmax(-1) == targets).float().mean().item()
    val = evals["val"]["metrics"]
    assert val["top5_accuracy"] == pytest.approx(top5, abs=1e-6) and val["top1_accuracy"] == pytest.approx(top1, abs=1e-6)
    assert val["top1_accuracy"] == pytest.approx(val["accuracy"], abs=1e-12)

    plugin, _ = exporter(tmp_path)
    record = evals["val"]
    plugin.trainctl_eval_end(EvalEnd(step=record["step"], split="val", loss=record["loss"], metrics=record["metrics"],
                                     time=record["time"]))
    samples = parse(generate_latest(plugin.registry).decode())
    assert value(samples, "trainctl_eval_metric", split="val", source="local", name="top5_accuracy") == val["top5_accuracy"]


def test_no_metric_plugin_hands_the_backend_nothing(registry, tmp_path):
    config = make_config(registry, tmp_path / "out", *TINY_GPT, 'plugins=["jsonl"]', "train.max_steps=1", backend="gpt")
    session = Run(config, registry, resume="never")
    assert session.backend.ctx.eval_metrics is None
    session.close()


def test_dpo_refuses_an_eval_metric_plugin(registry, hf, tmp_path):
    from tests import hf_assets
    from tests.test_hf_dpo import pair_rows, session
    from trainctl.kernel.errors import ConfigError

    data = hf_assets.write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    with pytest.raises(ConfigError, match=r"^hf.objective = 'dpo' evaluates preference pairs, not token predictions"):
        session(registry, hf, tmp_path / "out", data, 'plugins=["topk_accuracy"]', "hf.objective='dpo'")
