"""Bad preference rows through the real CLI (``hf.objective = "dpo"``): one clear line each,
exit 2, before the model loads and before anything is written.

NEEDS the DPO objective (branch ``dpo``): without it ``hf.objective`` is an unknown key and every
test here fails on the message, as it should. The problem lines are those of
``trainctl.backends.hf.preference_check`` (tests/test_preference_check.py covers each rule)."""

from __future__ import annotations

import json

import pytest

from tests import hf_assets
from tests.conftest import run_cli

USER = {"role": "user", "content": "What colour is the sky?"}


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def preference_rows(n: int = 12) -> list[dict]:
    """Explicit prompts as message lists: a speech asked, the next one chosen, a later one rejected
    (the first 12 prompts are 22-55 tokens: well inside the tests' model.max_length 128)."""
    pairs = hf_assets.speeches()
    return [{"prompt": [{"role": "user", "content": pairs[i][1]}], "chosen": answer(pairs[i + 1][1]),
             "rejected": answer(pairs[i + 7][1])} for i in range(n)]


LONG = {"role": "user", "content": "To be, or not to be, that is the question. " * 40}
CASES = {
    "missing rejected": ({"prompt": [USER], "chosen": answer("Blue.")}, "'rejected' is missing"),
    "empty chosen": ({"prompt": [USER], "chosen": answer(" "), "rejected": answer("Green.")}, "'chosen' is empty"),
    "identical": ({"prompt": [USER], "chosen": answer("Blue."), "rejected": answer("Blue.")},
                  "chosen and rejected are identical"),
    "prompt too long": ({"prompt": [LONG], "chosen": answer("Aye."), "rejected": answer("Nay.")},
                        "leaves no room for the answers; shorten the prompt, raise model.max_length, or set "
                        'hf.dpo.too_long = "drop"'),
    "mixed types": ({"prompt": "Sky?", "chosen": answer("Blue."), "rejected": "Green."}, "wrong types:"),
    "mixed forms": ({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."},
                    "the answers are strings but the file's first row uses message lists"),
    "no shared prefix": ({"chosen": [USER, *answer("Blue.")],
                          "rejected": [{"role": "user", "content": "Where?"}, *answer("Here.")]},
                         "share no leading turn"),
}


def dpo(hf, out, data, *extra: str):
    sets = hf.sets(data, 'hf.objective="dpo"', "train.max_steps=2", "data.val_fraction=0", *extra)
    return run_cli("run", "--yes", "--backend", "hf", "--out", str(out), *[a for item in sets for a in ("--set", item)],
                   timeout=300)


def write(path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_preference_row_is_one_line_and_exit_2(hf, tmp_path, case):
    row, expected = CASES[case]
    rows = preference_rows()
    rows.insert(2, row)  # file line 3
    data = write(tmp_path / "pref.jsonl", rows)
    proc = dpo(hf, tmp_path / "out", data)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("trainctl: error: ") and data in lines[0], lines[0]
    assert "data.train line 3: " in lines[0] and expected in lines[0], lines[0]
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before anything was trained or saved


def test_a_bad_validation_row_names_data_val(hf, tmp_path):
    train = write(tmp_path / "train.jsonl", preference_rows())
    val = write(tmp_path / "val.jsonl", [*preference_rows(3), CASES["identical"][0]])
    proc = dpo(hf, tmp_path / "out", train, f"data.val='{val}'")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "data.val line 4: chosen and rejected are identical" in line and val in line


def test_every_problem_is_counted_and_the_good_file_trains(hf, tmp_path):
    rows = preference_rows()
    bad = [dict(rows[i], rejected=rows[i]["chosen"]) if i % 4 == 1 else rows[i] for i in range(len(rows))]
    proc = dpo(hf, tmp_path / "bad", write(tmp_path / "bad.jsonl", bad))
    assert proc.returncode == 2 and "data check failed: 3 problem(s)" in proc.stderr, proc.stderr
    good = dpo(hf, tmp_path / "good", write(tmp_path / "good.jsonl", rows))
    assert good.returncode == 0, good.stdout + good.stderr
