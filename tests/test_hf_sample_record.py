"""The hf backend's sample record (``data.record_samples``): each step's lines name the training
rows it trained. Packed with the ids on, the rows are TRL's own, and every run of a packed row is
the tokens of the row its id names. A real CLI run killed -9 between checkpoints and resumed with
``--resume auto`` trained every row once per epoch, 0 duplicated and 0 skipped: shuffled map-style
conversations, and a packed stream over shuffled files. What the record cannot follow is one line."""

from __future__ import annotations

import json
import signal
from collections import Counter

from tests import hf_assets
from tests.conftest import make_config, run_cli
from tests.live import LiveRun, sets
from tests.test_sample_record import kill_between_checkpoints
from trainctl.backends import sample_record
from trainctl.kernel.run import Run

ROWS = 24  # 8 a step (batch 4 x grad_accum 2): 3 steps an epoch unpacked
COMMON = ("data.val_fraction=0", "train.eval_interval=0", "train.save_interval=10", "data.record_samples=true")


def prepared(registry, hf, out, *extra, data):
    """The backend of a run that is never fitted: its prepared rows and ids."""
    return Run(make_config(registry, out, *hf.sets(data, "data.val_fraction=0", "data.mask='none'", *extra), backend="hf"),
               registry, resume="never").backend


def test_packed_ids_name_the_tokens_of_trls_own_packed_rows(registry, hf, tmp_path):
    rows = hf_assets.write_jsonl(tmp_path / "text.jsonl", hf_assets.text_rows(ROWS))
    whole = prepared(registry, hf, tmp_path / "whole", "model.max_length=512", data=rows).sft.train["input_ids"]  # each row tokenized
    assert max(map(len, whole)) > 64  # some row is longer than a packed row
    for packing in ("bfd", "wrapped"):
        off = prepared(registry, hf, tmp_path / f"{packing}-off", f"data.packing='{packing}'", "model.max_length=64", data=rows).sft
        on = prepared(registry, hf, tmp_path / f"{packing}-on", f"data.packing='{packing}'", "model.max_length=64", "data.record_samples=true",
                     data=rows).sft
        assert off.row_ids is None and on.train[:] == off.train[:]  # TRL's packed rows, column by column
        packed = on.train["input_ids"]
        runs = on.row_ids.line(range(len(packed)), [0] * len(packed))
        pieces = iter(zip(runs["index"], runs["tokens"]))
        done = Counter()
        for sequence in packed:
            at = 0
            while at < len(sequence):
                row, n = next(pieces)
                start = done[row] if packing == "wrapped" else 0  # wrapped goes on where the last packed row cut it
                assert packing == "wrapped" or n == min(len(whole[row]), 64)  # BFD: the whole row, cut at 64
                assert sequence[at : at + n] == whole[row][start : start + n], (packing, row)
                at, done[row] = at + n, done[row] + n
        assert next(pieces, None) is None
        assert sorted(done) == list(range(ROWS))  # every row in the packed rows
        if packing == "wrapped":
            assert len(runs["index"]) > ROWS  # some row is cut across two packed rows, and listed with each


def records(out) -> dict[int, list[dict]]:
    return sample_record.read(out)


def every_row_once_per_epoch(out, *, steps: int, rows_per_step: int | None) -> None:
    """Steps 1..steps are each in the record once; every epoch but the last holds each of the
    ``ROWS`` rows once, the last a part of them once; unpacked, each step holds ``rows_per_step``."""
    lines = records(out)
    assert sorted(lines) == list(range(1, steps + 1)) and all(len(at) == 1 for at in lines.values())
    seen = [(e, i) for step in sorted(lines) for e, i in zip(lines[step][0]["epoch"], lines[step][0]["index"])]
    if rows_per_step:
        assert all(len(at[0]["index"]) == rows_per_step for at in lines.values())
    twice = [k for k, n in Counter(seen).items() if n > 1]
    assert not twice, f"duplicated (epoch, row): {twice}"
    last = max(e for e, _ in seen)
    assert last >= 2
    for epoch in range(last):
        assert sorted(i for e, i in seen if e == epoch) == list(range(ROWS)), f"epoch {epoch} skipped rows"
    assert set(i for e, i in seen if e == last) <= set(range(ROWS))
    assert [e for e, _ in seen] == sorted(e for e, _ in seen)  # epoch after epoch


def kill_and_resume(hf, tmp_path, data, *overrides: str) -> tuple[int, int, list[str]]:
    """A CLI run killed -9 between checkpoints, resumed with --resume auto to 6 steps past the
    kill: (the resumed checkpoint's step, the last step, the run's overrides)."""
    out = tmp_path / "run"
    run = LiveRun(out, model=hf.sets(data, *overrides, "train.max_steps=1000000"), args=["--backend", "hf"])
    try:
        saved = kill_between_checkpoints(run, kill=lambda: run.proc.send_signal(signal.SIGKILL))
    finally:
        run.close()
    assert run.proc.returncode == -signal.SIGKILL
    trained = max(records(out))
    assert trained > saved  # steps the checkpoint does not hold were in the record
    end = trained + 6
    done = run_cli("run", "--backend", "hf", "--yes", "--out", str(out), *sets(*hf.sets(data, *overrides, f"train.max_steps={end}")))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    starts = [e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == "run_start"]
    assert starts[-1]["resumed_from"].endswith(f"step-{saved:06d}")
    return saved, end, list(overrides)


def test_killed_and_resumed_conversations_train_every_row_once_per_epoch(hf, tmp_path):
    rows = hf_assets.write_jsonl(tmp_path / "messages.jsonl", hf_assets.message_rows(ROWS))
    _, end, _ = kill_and_resume(hf, tmp_path, rows, *COMMON, "data.shuffle=true")
    every_row_once_per_epoch(tmp_path / "run", steps=end, rows_per_step=8)
    first = records(tmp_path / "run")[1][0]["index"]
    assert first != sorted(first)  # shuffled


def test_killed_and_resumed_packed_stream_trains_every_row_once_per_epoch(hf, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = hf_assets.text_rows(ROWS)
    for i, part in enumerate((rows[:10], rows[10:])):
        hf_assets.write_jsonl(data / f"part-{i}.jsonl", part)
    stream = (*COMMON, "data.streaming=true", "data.shuffle=true", "data.packing='bfd'", "data.mask='none'")
    _, end, overrides = kill_and_resume(hf, tmp_path, data, *stream)
    every_row_once_per_epoch(tmp_path / "run", steps=end, rows_per_step=None)

    # the record numbers the stream's rows in its position: a resume without it is refused
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    done = run_cli("run", "--backend", "hf", "--yes", "--out", str(tmp_path / "run"),
                   *sets(*hf.sets(data, *overrides, "data.record_samples=false", f"train.max_steps={end + 2}")))
    assert done.returncode == 2 and "streamed with data.record_samples = true" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert max(records(tmp_path / "run")) == end  # the record as it was


def test_what_the_record_cannot_follow_is_one_line(hf, tmp_path):
    for objective, said in (("dpo", "DPO does not record its preference pairs"), ("grpo", "GRPO trains on the completions")):
        done = run_cli("run", "--backend", "hf", "--yes", "--out", str(tmp_path / objective),
                       *sets(*hf.sets(None, f"hf.objective='{objective}'", "data.record_samples=true")))
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
