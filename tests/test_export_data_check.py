"""``trainctl export`` (and ``sample`` of a sharded checkpoint, which exports first) builds the
backend only to load and write the checkpoint (``BackendContext.load_only``): the training data's
check is not run again. Shown by a data file that no longer passes it: export still writes a
checkpoint that loads, while ``trainctl eval``, which scores that data, refuses it in one line."""

from __future__ import annotations

import shutil

from tests.conftest import run_cli
from trainctl.kernel.checkpoint_files import checkpoints, verify


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_export_skips_the_training_data_check(hf, tmp_path):
    data = tmp_path / "messages.jsonl"
    shutil.copyfile(hf.messages, data)
    run_cli("run", "--yes", "--backend", "hf", "--out", str(tmp_path / "run"),
            *sets(*hf.sets(data, "train.max_steps=1", "train.eval_interval=0", 'plugins=["checkpoint"]')), check=True)
    with data.open("a") as f:
        f.write("{not json\n")  # a row the data check refuses (past the rows the model is built from)
    evaluated = run_cli("eval", str(tmp_path / "run"))
    assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr
    assert "line 65" in evaluated.stderr.strip().splitlines()[-1]

    out = tmp_path / "export"
    done = run_cli("export", str(tmp_path / "run"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "data check" not in done.stderr + done.stdout
    assert verify(out) is None and (out / "model.safetensors").is_file()
    step = checkpoints(tmp_path / "run" / "checkpoints")[-1].name
    assert "step 1" in done.stdout and step == "step-000001"
    texts = run_cli("sample", str(out), "--max-new-tokens", "5", "--greedy", check=True).stdout
    assert texts.strip()
