"""``data.streaming``: hf training rows read as a stream (datasets' streaming ``load_dataset``,
prepared by TRL on the fly). In file order the stream trains exactly the rows and losses of the
same data loaded whole; a stopped run resumes from the stream position in its checkpoint and goes
on bit for bit, packing and reshuffled files included; what a stream cannot do, and a checkpoint
whose files changed, are one line and exit 2."""

from __future__ import annotations

import json
import subprocess

import torch

from tests import hf_assets
from tests.conftest import ROOT, make_config, run_cli
from tests.live import sets
from tests.test_distributed import HF_TOLERANCE, TORCHRUN, assert_close, env
from trainctl.kernel.run import Run

STREAM = ("data.streaming=true", "data.val_fraction=0", "train.eval_interval=0", "data.mask='none'")


def session(registry, hf, out, *extra, data, resume="never"):
    return Run(make_config(registry, out, *hf.sets(data, *extra), backend="hf"), registry, resume=resume)


def losses(out):
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


def shards(folder, rows, sizes):
    folder.mkdir()
    start = 0
    for i, n in enumerate(sizes):
        hf_assets.write_jsonl(folder / f"part-{i:02d}.jsonl", rows[start : start + n])
        start += n
    return folder


def test_a_stream_in_file_order_trains_what_the_loaded_file_trains(registry, hf, tmp_path):
    common = ('plugins=["jsonl"]', "train.max_steps=10", "data.shuffle=false", "data.val_fraction=0",
              "train.eval_interval=0", "data.mask='none'")  # 64 rows, 8 a step: step 9 starts the second pass
    loaded = session(registry, hf, tmp_path / "loaded", *common, data=hf.text)
    streamed = session(registry, hf, tmp_path / "streamed", *common, "data.streaming=true", data=hf.text)
    assert streamed.backend.stream is not None and loaded.backend.stream is None
    assert "streamed from 1 json file(s)" in streamed.plan.details["data"]
    assert loaded.fit().status == streamed.fit().status == "completed"
    assert losses(tmp_path / "streamed") == losses(tmp_path / "loaded")  # every step, exactly
    for a, b in zip(loaded.backend.model.parameters(), streamed.backend.model.parameters()):
        assert torch.equal(a, b)


def test_a_stopped_stream_resumes_where_it_was_bit_for_bit(registry, hf, tmp_path):
    data = shards(tmp_path / "data", hf_assets.text_rows(64), [20, 20, 24])
    common = (*STREAM, "data.packing='bfd'", "data.shuffle=true", "train.max_steps=12", "plugin.lr.warmup_steps=2")
    whole = session(registry, hf, tmp_path / "whole", 'plugins=["lr", "checkpoint", "jsonl"]', *common, data=data)
    assert whole.fit().status == "completed"
    assert whole.backend.stream.epoch >= 2  # packed, the rows run out more than once: epochs reorder the files

    split = tmp_path / "split"
    first = session(registry, hf, split, 'plugins=["lr", "checkpoint", "jsonl", "script"]', *common,
                    "plugin.script.stop_at=[5]", data=data)
    assert first.fit().step == 5
    saved = json.loads((split / "checkpoints" / "step-000005" / "trainer_state.json").read_text())["stream"]
    assert saved["step"] == 5 and saved["files"] == [[str(p), p.stat().st_size] for p in sorted(data.iterdir())]
    second = session(registry, hf, split, 'plugins=["lr", "checkpoint", "jsonl"]', *common, data=data, resume="auto")
    assert second.resumed_from.endswith("step-000005")
    assert second.fit().status == "completed"
    ref, resumed = losses(tmp_path / "whole"), losses(split)
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == ref  # the steps after the resume too, exactly
    for a, b in zip(whole.backend.model.parameters(), second.backend.model.parameters()):
        assert torch.equal(a, b)


def test_a_stream_resumes_on_two_ranks_where_one_process_left_it(registry, hf, tmp_path):
    """The position is the stream's, not a rank's: a checkpoint of one process resumes under
    torchrun with 2 ranks on the same rows (every rank reads the stream, keeps its micro-batches)."""
    data = shards(tmp_path / "data", hf_assets.text_rows(64), [30, 34])
    common = (*STREAM, "data.packing='bfd'", "plugin.lr.warmup_steps=1", "plugin.lr.decay_steps=1000")
    whole = session(registry, hf, tmp_path / "whole", 'plugins=["lr", "jsonl"]', *common, "train.max_steps=8", data=data)
    assert whole.fit().status == "completed"
    out = tmp_path / "moved"
    first = session(registry, hf, out, 'plugins=["lr", "checkpoint", "jsonl"]', *common, "train.max_steps=4", data=data)
    assert first.fit().status == "completed"
    proc = subprocess.run([*TORCHRUN, "-m", "trainctl", "run", "--yes", "--backend", "hf", "--out", str(out),
                           *sets(*hf.sets(data, *common, "train.max_steps=8"))],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref, moved = losses(tmp_path / "whole"), losses(out)
    assert sorted(moved) == list(range(1, 9)) and all(moved[k] == ref[k] for k in range(1, 5))
    assert_close({k: moved[k] for k in range(5, 9)}, {k: ref[k] for k in range(5, 9)}, HF_TOLERANCE)


def test_what_a_stream_cannot_do_and_changed_files_are_one_line(registry, hf, tmp_path):
    data = shards(tmp_path / "data", hf_assets.text_rows(32), [16, 16])
    cases = {
        "cannot hold data.val_fraction": ["data.streaming=true", "train.max_steps=2"],
        "data.epochs needs the number of rows": [*STREAM, "data.epochs=1"],
        'objective = "dpo" reads its preference pairs into memory': ["data.streaming=true", "data.val_fraction=0",
                                                                      "hf.objective='dpo'"],
    }
    for said, overrides in cases.items():
        done = run_cli("run", "--backend", "hf", "--yes", "--out", str(tmp_path / "bad"), *sets(*hf.sets(data, *overrides)))
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr

    out = tmp_path / "run"
    run = session(registry, hf, out, 'plugins=["checkpoint"]', *STREAM, "train.max_steps=2", data=data)
    assert run.fit().status == "completed"
    with (data / "part-01.jsonl").open("a") as f:  # the files move under the saved position
        f.write(json.dumps({"text": "one more row"}) + "\n")
    done = run_cli("run", "--backend", "hf", "--yes", "--out", str(out), *sets(*hf.sets(data, *STREAM, "train.max_steps=4")))
    assert done.returncode == 2 and "streamed other files than data.train" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert (out / "checkpoints" / "step-000002" / "trainer_state.json").is_file()  # nothing lost

