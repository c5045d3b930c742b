"""The bus contract for events emitted from ``trainctl_run_end``: delivered at once to the
plugins whose run_end has not run yet, never to one that already ended."""

from __future__ import annotations

import time

from tests import fake_backend, recording_plugins
from tests.conftest import make_config
from tests.worker_process import events
from trainctl.hooks import PluginSpec, hookimpl
from trainctl.hooks.events import Notice
from trainctl.hooks.notices import NoticeKind
from trainctl.kernel.registry import Registry
from trainctl.kernel.run import Run


class LastWord:
    def __init__(self, config, run) -> None:
        self.run = run

    @hookimpl
    def trainctl_run_end(self, event) -> None:
        self.run.emit(Notice(step=event.step, kind="last_word", message="said in run_end", time=time.time()))


class Provider:
    @hookimpl
    def trainctl_register_plugins(self, register) -> None:
        register(PluginSpec(name="last_word", factory=LastWord, description="emits in run_end",
                            notices=(NoticeKind(name="last_word", sender="last_word", when="in its run_end"),)))


def test_events_emitted_in_run_end_reach_only_the_plugins_still_to_end(tmp_path):
    registry = Registry.discover(entry_points=False)
    registry.add_module(fake_backend, source="tests")
    registry.add_module(recording_plugins, source="tests")
    registry.add_module(Provider(), source="tests")
    out = tmp_path / "out"
    config = make_config(registry, out, 'plugins=["recorder", "last_word", "jsonl"]', "train.max_steps=3")
    result = Run(config, registry, resume="never").fit()
    assert result.status == "completed"
    recorder = recording_plugins.INSTANCES["recorder"]
    assert recorder.calls[-1][0] == "run_end"
    kinds = [getattr(e, "kind", None) for e in recorder.events]
    assert "last_word" not in kinds  # the recorder's run_end had run before it was said
    log = events(out)
    assert [(e["event"], e.get("kind")) for e in log[-2:]] == [("notice", "last_word"), ("run_end", None)]
