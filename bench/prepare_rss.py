"""Peak memory and time of ``trainctl prepare`` on a large corpus (target: <= 500 MB RSS at any
size). The corpus is the embedded tiny-shakespeare repeated with variation (each copy's lines
shuffled, every other copy upper-cased, a copy number in its first line) until it reaches
``--mb``; it lives in a temporary directory, removed at the end.

    .venv/bin/python bench/prepare_rss.py [--mb 300] [--tokenizers char,gpt2] [--old REV]

``--old REV`` also measures ``prepare()`` of ``trainctl/backends/gpt/data.py`` as it was at git
revision REV (loaded from ``git show`` into a temporary module, run in its own process) and checks
that both wrote the same bytes. The gpt2 tokenizer needs tiktoken's gpt2 files in its cache
(``TIKTOKEN_CACHE_DIR``).

Each run is measured by a small process that starts it and reads ``RUSAGE_CHILDREN``'s
``ru_maxrss``: a child's peak starts at its parent's (the fork), so this script, which held the
corpus in pieces, does not start the measured one.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
DATA_MODULE = "trainctl/backends/gpt/data.py"
FILES = ("train.bin", "val.bin", "meta.json")

MEASURE = """\
import resource, subprocess, sys, time
started = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - started)
"""

OLD_PREPARE = """\
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import old_gpt_data
old_gpt_data.prepare(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
"""


def write_corpus(path: Path, megabytes: int) -> int:
    sys.path.insert(0, str(ROOT))
    from trainctl.backends.gpt.data import embedded_text

    lines = embedded_text().splitlines(keepends=True)
    rng = random.Random(0)
    target, written, copy = megabytes * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(lines)
            text = f"Copy {copy}\n" + "".join(lines)
            text = text.upper() if copy % 2 else text
            written += f.write(text[: target - written])
            copy += 1
    return path.stat().st_size


def measure(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one process running ``argv``."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *argv], env=ENV, capture_output=True, text=True, check=True)
    rc, kib, seconds = proc.stdout.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(argv)} exited {rc}:\n{proc.stderr}")
    return int(kib) / 1024, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=300, help="corpus size in MB")
    parser.add_argument("--tokenizers", default="char,gpt2")
    parser.add_argument("--old", metavar="REV", help="also measure prepare() as it was at this git revision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.txt"
        print(f"corpus: {write_corpus(corpus, args.mb) / 1e6:.0f} MB")
        if args.old:
            source = subprocess.run(["git", "show", f"{args.old}:{DATA_MODULE}"], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout
            (tmp / "old_gpt_data.py").write_text(source)
        for kind in args.tokenizers.split(","):
            new = tmp / f"new-{kind}"
            rss, seconds = measure([sys.executable, "-m", "trainctl", "prepare", str(corpus), "--out", str(new),
                                    "--tokenizer", kind])
            print(f"{kind:5} streaming    : peak RSS {rss:7.0f} MB, {seconds:6.1f} s")
            if args.old:
                old = tmp / f"old-{kind}"
                rss, seconds = measure([sys.executable, "-c", OLD_PREPARE, str(tmp), str(corpus), str(old), kind])
                same = all(filecmp.cmp(new / name, old / name, shallow=False) for name in FILES)
                print(f"{kind:5} {args.old:13}: peak RSS {rss:7.0f} MB, {seconds:6.1f} s, same bytes: {same}")
            for out in (new, tmp / f"old-{kind}"):
                for name in FILES:
                    (out / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
