"""The precomputed DPO reference's cache (``dpo_ref_logps.safetensors`` in the run directory)
through the real CLI. Anyone who can write the run directory can write that file, and its
fingerprint is no secret: it is copied from a good file here, as an attacker would copy it.

A file that carries the right fingerprint but whose tensors cannot be these pairs' reference
log-probs (rows shifted, values offset, NaN, integers, the wrong shape, rows or a split missing,
truncated) is one warning line naming the file and the problem; the log-probs are then computed
again from the starting weights and the file replaced, as a cache of other weights or data always
was, so the run's losses are those of a run that never saw it. A valid cache is read back,
unchanged, to the same losses.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests import hf_assets
from tests.conftest import run_cli
from tests.test_hf_dpo import pair_rows

CACHE = "dpo_ref_logps.safetensors"
# 48 pairs: 36 train, 12 val; nothing evaluated, so the losses are the cache's only reader
SETS = ("hf.objective='dpo'", "hf.dpo.reference='precomputed'", "train.max_steps=2", "train.eval_interval=0",
        "data.val_fraction=0.25", "plugin.lr.warmup_steps=1")
Tensors = dict[str, torch.Tensor]


def dpo(hf, out, data):
    sets = hf.sets(data, *SETS)
    return run_cli("run", "--yes", "--backend", "hf", "--out", str(out), *[a for s in sets for a in ("--set", s)],
                   timeout=300)


def losses(out) -> list[float]:
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "step"]


@pytest.fixture(scope="module")
def clean(hf, tmp_path_factory):
    """A run that computed the cache itself: the data, the file's bytes and the run's losses."""
    root = tmp_path_factory.mktemp("dpo-cache")
    data = hf_assets.write_jsonl(root / "pairs.jsonl", pair_rows())
    proc = dpo(hf, root / "clean", data)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, (root / "clean" / CACHE).read_bytes(), losses(root / "clean")


def forge(path, good: bytes, change: Callable[[Tensors], Tensors]) -> None:
    """The good file's tensors changed, under the good file's fingerprint, written to ``path``."""
    path.write_bytes(good)
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({k: v.contiguous() for k, v in change(tensors).items()}, str(path), metadata=metadata)


def replace(t: Tensors, split: str, value: torch.Tensor) -> Tensors:
    return {**t, split: value}


def with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[5, 1] = float("nan")
    return x


CASES: dict[str, tuple[Callable[[Tensors], Tensors], str]] = {
    # every row holds its neighbour's values: shape, dtype and finiteness all right (today: loss 8.06)
    "rows shifted by one": (lambda t: replace(t, "train", t["train"].roll(1, dims=0)),
                            "train: its first 4 rows are not these pairs' reference log-probs"),
    # the audit's loss 10.0 instead of 0.693: the chosen log-probs 100 nats too high
    "values offset": (lambda t: replace(t, "train", t["train"] + torch.tensor([100.0, 0.0])),
                      "train: its first 4 rows are not these pairs' reference log-probs"),
    # every row read one off, and the last pair's row never read (today: losses 8.06 and 19.05)
    "an extra row in front": (lambda t: replace(t, "train", torch.cat([t["train"][:1], t["train"]])),
                              "train: 37 rows for its 36 pairs"),
    # an IndexError the first time a batch reaches the end of the split
    "rows missing": (lambda t: replace(t, "val", t["val"][:-3]), "val: 9 rows for its 12 pairs"),
    # today: the first step's loss NaN, the step skipped
    "NaN": (lambda t: replace(t, "train", with_nan(t["train"])), "train: 1 value(s) not finite (NaN or inf)"),
    "integers": (lambda t: replace(t, "train", t["train"].round().to(torch.int64)), "train: dtype I64, not F32 (float32)"),
    # today: an internal error (IndexError) at the first step
    "wrong shape": (lambda t: replace(t, "train", t["train"][:, :1]),
                    "train: shape (36, 1), not (36, 2) (chosen, rejected for each pair)"),
    "a split missing": (lambda t: {"train": t["train"]}, "it covers ['train'], this run's splits are ['train', 'val']"),
}


@pytest.mark.parametrize("case", list(CASES) + ["truncated"])
def test_a_forged_cache_is_one_line_then_computed_again(hf, clean, tmp_path, case):
    data, good, expected = clean
    out = tmp_path / "out"
    out.mkdir()
    if case == "truncated":
        (out / CACHE).write_bytes(good[: len(good) // 2])
        problem = "not a readable safetensors file"
    else:
        change, problem = CASES[case]
        forge(out / CACHE, good, change)
    proc = dpo(hf, out, data)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"trainctl: warning: {out / CACHE}: {problem}"), line
    assert line.endswith("; not used: computed again from the starting weights, and the file replaced"), line
    assert f"precomputed from the starting weights, cached in {out / CACHE}" in proc.stdout
    assert (out / CACHE).read_bytes() == good  # the forged file replaced by the true log-probs
    assert losses(out) == expected


def test_a_valid_cache_is_read_back_to_the_same_losses(hf, clean, tmp_path):
    data, good, expected = clean
    out = tmp_path / "out"
    out.mkdir()
    (out / CACHE).write_bytes(good)
    proc = dpo(hf, out, data)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr
    assert f"precomputed, read from {out / CACHE} (not recomputed)" in proc.stdout
    assert (out / CACHE).read_bytes() == good
    assert losses(out) == expected
