"""Data-side memory of a gpt mixture streaming from token shards far larger than its budget
(issue 20: <= 200 MB RSS streaming 2 GB of shards).

Writes ``--sources`` prepared datasets (``train.bin``, ``val.bin``, ``meta.json`` as ``trainctl
prepare`` writes them: uint16 byte-level ids) of ``--gb`` GiB in all into a temporary directory,
then, in a fresh process that imports numpy and the mixture alone (no torch), draws training
batches of ``--batch`` x ``--block`` tokens from the mixture as the gpt backend does
(``Mixture.draw`` + ``Mixture.windows``) until it has read as many bytes as the shards hold.
It reads ``/proc/self/status`` every 50 batches: ``VmRSS`` (all of it), ``RssAnon`` (the
process' own memory) and ``RssFile`` (file pages mapped into it: the shards' pages). Data-side
RSS is the peak less the RSS before the shards were opened.

Run twice: as trainctl runs (``RESIDENT_BYTES`` between unmappings) and with unmapping off, to
show what the unmapping buys and costs. The files are removed at the end.

    .venv/bin/python bench/mixture_rss.py [--gb 2] [--sources 2] [--batch 32] [--block 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1 << 24  # tokens written at a time

STREAM = r"""
import json, sys, time
from pathlib import Path
import numpy as np

def status():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}

base = status()
from trainctl.backends.gpt import mixture
from trainctl.backends.gpt.config import DataConfig, SourceConfig
cfg = json.loads(sys.argv[1])
if not cfg["unmap"]:
    mixture.RESIDENT_BYTES = 1 << 62
data = DataConfig(sources=tuple(SourceConfig(path=p, weight=w) for p, w in zip(cfg["paths"], cfg["weights"])))
before = status()
mix = mixture.load(data, seed=1337)
B, T = cfg["batch"], cfg["block"]
total = sum(int(n) for n in mix.lengths["train"]) * 2
read, step, peak, counts = 0, 0, dict(before), np.zeros(len(mix.sources), dtype=np.int64)
started = time.perf_counter()
while read < total:
    d = mix.draw("train", T, B, 1337, step, 0, 1)
    w = mix.windows("train", d, T)
    counts += np.bincount(d.source, minlength=len(mix.sources))
    read += w.shape[0] * (T + 1) * 2
    step += 1
    if step % 50 == 0:
        peak = {k: max(peak[k], v) for k, v in status().items()}
seconds = time.perf_counter() - started
peak = {k: max(peak[k], v) for k, v in status().items()}
print(json.dumps({"base": base, "before": before, "peak": peak, "batches": step, "bytes_read": read,
                  "seconds": seconds, "us_per_batch": seconds / step * 1e6,
                  "realized": (counts / counts.sum()).tolist()}))
"""


def write_sources(root: Path, gb: float, n: int) -> list[Path]:
    tokens = int(gb * 2**30 / 2 / n)  # uint16
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        d = root / f"source{k}"
        d.mkdir()
        n_val = tokens // 100
        for name, count in (("train.bin", tokens - n_val), ("val.bin", n_val)):
            with open(d / name, "wb") as f:
                for lo in range(0, count, CHUNK):
                    rng.integers(0, 256, size=min(CHUNK, count - lo), dtype=np.uint16).tofile(f)
        meta = {"tokenizer": "byte", "vocab_size": 256, "dtype": "uint16", "train_tokens": tokens - n_val, "val_tokens": n_val}
        (d / "meta.json").write_text(json.dumps(meta))
        paths.append(d)
    return paths


def stream(paths: list[Path], weights: list[float], args: argparse.Namespace, unmap: bool) -> dict:
    cfg = {"paths": [str(p) for p in paths], "weights": weights, "batch": args.batch, "block": args.block, "unmap": unmap}
    out = subprocess.run([sys.executable, "-c", STREAM, json.dumps(cfg)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=1024)
    args = parser.parse_args()
    weights = [float(k + 1) for k in range(args.sources)]  # 1:2:... so the realized shares say something
    with tempfile.TemporaryDirectory(prefix="mixture_rss.") as tmp:
        paths = write_sources(Path(tmp), args.gb, args.sources)
        size = sum(f.stat().st_size for p in paths for f in p.iterdir())
        print(f"{args.sources} sources, {size / 2**30:.2f} GiB of shards, batches of {args.batch} x {args.block} tokens, "
              f"weights {weights}")
        for unmap in (True, False):
            r = stream(paths, weights, args, unmap)
            mib = lambda key, of="peak": (r[of][key] - r["before"][key]) / 2**20  # noqa: E731
            print(f"  unmap {'on ' if unmap else 'off'}: {r['batches']} batches, {r['bytes_read'] / 2**30:.2f} GiB read in "
                  f"{r['seconds']:.1f} s ({r['us_per_batch']:.0f} us/batch); data-side RSS {mib('VmRSS'):.0f} MiB "
                  f"(anon {mib('RssAnon'):.0f}, file {mib('RssFile'):.0f}); process RSS before the shards "
                  f"{r['before']['VmRSS'] / 2**20:.0f} MiB; realized shares "
                  f"{', '.join(f'{s:.4f}' for s in r['realized'])} of {', '.join(f'{w / sum(weights):.4f}' for w in weights)}")


if __name__ == "__main__":
    main()
