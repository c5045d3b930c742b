"""What ``datasets.load_dataset`` reads, the hf backend reads, through the real CLI (dry runs: the
plan counts the rows of each split): a ``save_to_disk`` DatasetDict's splits, a folder of data
files, and a builder name with its files; every failure is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import hf_assets
from tests.conftest import ROOT, cli_env

ROWS = hf_assets.prompt_completion_rows(60)
TRAIN, TEST = ROWS[:40], ROWS[40:]  # 40 training rows, 20 held-out rows: the plan tells them apart


def dry_run(hf, tmp_path, *sets, cwd=None):
    args = ["run", str(ROOT / "configs" / "hf_tiny.toml"), "--dry-run", "--out", str(tmp_path / "out"),
            *[a for s in (f"model.name_or_path={hf.llama}", f"model.tokenizer={hf.plain_tokenizer}",
                          "data.packing=false", *sets) for a in ("--set", s)]]
    env = cli_env() | {"HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "trainctl", *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def counts(proc):
    """The plan's row counts: "40 train rows, 40 kept; 20 val rows from data.val; ..."."""
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("data: prompt_completion: ", 1)[1].splitlines()[0]


def one_line(proc, message):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr


def test_a_saved_dataset_dict_reads_the_splits_named_by_split_and_val_split(hf, tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TRAIN),
                          "test": datasets.Dataset.from_list(TEST)}).save_to_disk(str(saved))
    # val_split defaults to "test": validation never sees a training row
    assert counts(dry_run(hf, tmp_path, f"data.train={saved}", f"data.val={saved}")) \
        .startswith("40 train rows, 40 kept; 20 val rows from data.val")
    assert counts(dry_run(hf, tmp_path, f"data.train={saved}", "data.split=test", "data.val_fraction=0.0")) \
        .startswith("20 train rows, 20 kept")
    one_line(dry_run(hf, tmp_path, f"data.train={saved}", f"data.val={saved}", "data.val_split=validation"),
             f"data.val {saved} has no split 'validation'; its splits are train, test: set data.val_split to one of them")
    one_line(dry_run(hf, tmp_path, f"data.train={saved}", "data.split=valid"),
             f"data.train {saved} has no split 'valid'; its splits are train, test: set data.split to one of them")
    # a saved Dataset (no dict) has no splits to choose from: the whole of it, whatever the split
    plain = tmp_path / "plain"
    datasets.Dataset.from_list(TEST).save_to_disk(str(plain))
    assert counts(dry_run(hf, tmp_path, f"data.train={saved}", f"data.val={plain}", "data.val_split=validation")) \
        .startswith("40 train rows, 40 kept; 20 val rows from data.val")


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_folder_of_data_files_reads_as_load_dataset_reads_it(hf, tmp_path, suffix):
    import datasets

    folder = tmp_path / "folder"
    folder.mkdir()
    for name, rows in (("train", TRAIN), ("test", TEST)):  # load_dataset's splits from the file names
        if suffix == "jsonl":
            hf_assets.write_jsonl(folder / f"{name}.jsonl", rows)
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(folder / f"{name}.parquet"))
    assert counts(dry_run(hf, tmp_path, f"data.train={folder}", f"data.val={folder}")) \
        .startswith("40 train rows, 40 kept; 20 val rows from data.val")
    assert counts(dry_run(hf, tmp_path, f"data.train={folder}", "data.split=test", "data.val_fraction=0.0")) \
        .startswith("20 train rows, 20 kept")
    one_line(dry_run(hf, tmp_path, f"data.train={folder}", f"data.val={folder}", "data.val_split=validation"),
             f"data.val {folder} has no split 'validation'; its splits are train, test: set data.val_split to one of them")


def test_a_folder_datasets_cannot_read_is_one_line(hf, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    hf_assets.write_jsonl(bad / "train.jsonl", TRAIN)
    with (bad / "train.jsonl").open("a") as f:
        f.write("{not json\n")
    one_line(dry_run(hf, tmp_path, f"data.train={bad}"),
             f"data.train {bad}: datasets cannot read it (ArrowInvalid: JSON parse error")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("no data here\n")
    one_line(dry_run(hf, tmp_path, f"data.train={empty}"),
             f"data.train {empty}: datasets cannot read it (DataFilesNotFoundError: No (supported) data files found")


def test_a_builder_name_reads_its_data_files(hf, tmp_path):
    import datasets

    (tmp_path / "data").mkdir()
    hf_assets.write_jsonl(tmp_path / "data" / "train-0.jsonl", TRAIN[:25])
    hf_assets.write_jsonl(tmp_path / "data" / "train-1.jsonl", TRAIN[25:])
    datasets.Dataset.from_list(TEST).to_parquet(str(tmp_path / "data" / "test.parquet"))
    # globs relative to the working directory, as load_dataset resolves them; the files are one split
    # ("train"), so data.val_split does not apply to val_files
    run = dry_run(hf, tmp_path, "data.train=json", "data.data_files=['data/train-*.jsonl']",
                  "data.val=parquet", "data.val_files=['data/test.parquet']", cwd=tmp_path)
    assert counts(run).startswith("40 train rows, 40 kept; 20 val rows from data.val")
    for sets, message in [
        (["data.train=json"], 'data.train = "json" is a datasets builder: set data.data_files = ["..."]'),
        (["data.train=json", "data.data_files=['data/train-*.jsonl', 'data/valid-*.jsonl']"],
         f"data.data_files 'data/valid-*.jsonl' matches no file (relative to {tmp_path})"),
        (["data.train=data/train-0.jsonl", "data.data_files=['data/train-*.jsonl']"],
         "data.data_files is set but data.train = 'data/train-0.jsonl' is not a datasets builder, so they would be ignored"),
        (["data.train=json", "data.data_files=['data/train-*.jsonl']", "data.val_files=['data/test.parquet']"],
         "data.val_files is set but data.val is not, so they would be ignored"),
        (["data.train=json", "data.data_files=['data/train-*.jsonl']", "data.split=test"],
         'data.split = "test" names a split, but data.data_files make one split ("train"); drop data.split'),
        (["data.train=parquet", "data.data_files=['data/train-0.jsonl']"],
         "data.train parquet[data/train-0.jsonl]: datasets cannot read it (ArrowInvalid: Parquet magic bytes not found"),
    ]:
        one_line(dry_run(hf, tmp_path, *sets, cwd=tmp_path), message)
