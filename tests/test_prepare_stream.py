"""``trainctl prepare`` streams: the files are the bytes that tokenizing the whole text at once
gives (``tokenize`` + ``split``), for every tokenizer and any chunk size, and memory stays flat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env
from trainctl.backends.gpt import data
from trainctl.kernel.errors import ConfigError

FILES = ("train.bin", "val.bin", "meta.json")
CHUNKS = (1, 7, 64, 4096)

# Every case the cut rule has to get right: runs of newlines and spaces before and after a line,
# \r\n and lone \r (text mode turns both into \n, across a chunk edge too), contractions at a cut,
# lines that end in spaces or tabs, unicode letters, digits and emoji, no newline at the end.
VARIED = (
    "First line\nsecond line\n\nthird after a blank\n\n\nfourth after two\n"
    "  indented\n\tTabbed\nends in spaces   \nends in a tab\t\nx\ny\nz\n"
    "it's they'll we've I'm you'd don't\nCRLF line\r\nnext\r\n\r\nafter a blank CRLF\rlone CR\n"
    "héllo wörld straße ÆØÅ\n日本語のテキスト\n한국어 텍스트\nемодзи 😀🎉 👍🏽\n"
    "numbers 123 4567 89.01\n$%^&*() [brackets]\n 'quote' \"dq\"\n\u00a0nbsp\u2003em space\n"
    "\u2028line separator\u2029para\x1cfile separator\x0bvertical tab\x0cform feed\n"
    "a b c d e f g h i j k l m n o p q r s t u v w x y z\nno newline at the end"
)


def texts() -> dict[str, str]:
    shakespeare = data.embedded_text()
    return {"varied": VARIED * 3, "shakespeare": shakespeare[:60_000], "one-line": shakespeare[:20_000].replace("\n", " ")}


def one_shot(text_file: Path, kind: str, val_fraction: float = data.VAL_FRACTION) -> dict[str, bytes]:
    """What prepare wrote before it streamed: the whole text read and tokenized at once."""
    ids, meta = data.tokenize(text_file.read_text(encoding="utf-8"), kind)
    train, val = data.split(ids, val_fraction)
    meta.update(source=str(text_file), train_tokens=len(train), val_tokens=len(val))
    return {"train.bin": train.tobytes(), "val.bin": val.tobytes(), "meta.json": json.dumps(meta, indent=1).encode()}


def written(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in FILES}


def toy_gpt2():
    """tiktoken with gpt2's own pre-tokenizing pattern and a small vocabulary: the real gpt2 files
    are a download, and where a text may be cut depends only on the pattern (tiktoken encodes each
    of its pieces apart). Whitespace runs are tokens, so a cut inside a run changes the ids."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    merges = [b"\n\n", b"\n\n\n", b"  ", b"   ", b"    ", b" \n", b"\t\n", b"\r\n", b"th", b"he", b"the",
              b" t", b" th", b" the", b"in", b" a", b"er", b"an", b"ou", b"'s", b"ll", b"'ll", b"12", b"123"]
    ranks = {bytes([b]): b for b in range(256)} | {m: 256 + i for i, m in enumerate(merges)}
    return tiktoken.Encoding(name="gpt2-pattern", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture
def gpt2_pattern(monkeypatch):
    enc = toy_gpt2()
    monkeypatch.setattr(data, "_tiktoken", lambda: enc)
    return enc


@pytest.mark.parametrize("kind", ["char", "byte", "gpt2"])
def test_streamed_files_are_the_one_shot_bytes(tmp_path, kind, request):
    if kind == "gpt2":
        request.getfixturevalue("gpt2_pattern")
    for name, text in texts().items():
        src = tmp_path / f"{name}.txt"
        src.write_bytes(text.encode("utf-8"))  # bytes: the \r\n stay in the file
        expected = one_shot(src, kind)
        for chunk_chars in CHUNKS:
            out = tmp_path / f"{name}-{kind}-{chunk_chars}"
            meta = data.prepare(src, out, kind, chunk_chars=chunk_chars)
            assert written(out) == expected, (name, chunk_chars)
            assert sorted(os.listdir(out)) == sorted(FILES)  # no temporary file left
            assert meta["train_tokens"] + meta["val_tokens"] == len(expected["train.bin"] + expected["val.bin"]) // 2


def test_every_cut_bpe_cut_finds_encodes_alike(gpt2_pattern):
    """The rule itself, at every cut it allows in varied text: encoding the two sides apart is the
    encoding of the whole; and the places it must refuse are refused."""
    enc = gpt2_pattern
    text = VARIED.replace("\r\n", "\n").replace("\r", "\n") + data.embedded_text()[:5_000]
    whole = enc.encode_ordinary(text)
    cuts = set()
    for end in range(2, len(text) + 1):
        cut = data.bpe_cut(text[:end])
        if cut:
            cuts.add(cut)
    assert len(cuts) > 100
    for cut in sorted(cuts):
        assert enc.encode_ordinary(text[:cut]) + enc.encode_ordinary(text[cut:]) == whole, repr(text[cut - 5:cut + 5])
    assert data.bpe_cut("a\n\nb") == 0 and data.bpe_cut("a \nb") == 0 and data.bpe_cut("a\n b") == 0
    assert data.bpe_cut("ab\n") == 0 and data.bpe_cut("1 2") == 0 and data.bpe_cut("é è") == 0
    assert data.bpe_cut("a\nb") == 2 and data.bpe_cut("ab cd") == 2


def test_bad_input_is_one_config_error_and_keeps_the_old_files(tmp_path):
    out = tmp_path / "out"
    good = tmp_path / "good.txt"
    good.write_text(VARIED, encoding="utf-8")
    data.prepare(good, out, "byte")
    before = written(out)

    bad = tmp_path / "bad.txt"
    bad.write_bytes(VARIED.encode() * 20 + b"\xff tail")  # found in the streaming pass, after chunks were written
    short = tmp_path / "short.txt"
    short.write_text("ab")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [(bad, "byte", "is not UTF-8 text"), (bad, "char", "is not UTF-8 text"), (short, "char", "too short"),
             (empty, "byte", "is empty"), (empty, "char", "is empty"), (tmp_path, "byte", "cannot read")]
    os.mkfifo(pipe := tmp_path / "pipe")
    cases.append((pipe, "char", "not a regular file"))  # read twice, a pipe would lose its text
    for src, kind, message in cases:
        with pytest.raises(ConfigError, match=message) as exc:
            data.prepare(src, out, kind, chunk_chars=64)
        assert "\n" not in str(exc.value)
        assert written(out) == before and sorted(os.listdir(out)) == sorted(FILES), (src, kind)
    with pytest.raises(ConfigError, match="too short"):
        data.prepare(short, tmp_path / "new" / "dir", "byte")
    assert not (tmp_path / "new" / "dir").exists()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainctl", "prepare", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


def test_the_cli_writes_the_one_shot_bytes_and_fails_in_one_line(tmp_path, shakespeare):
    proc = cli(str(shakespeare), "--out", str(tmp_path / "out"), "--tokenizer", "char")
    assert proc.returncode == 0, proc.stderr
    assert "1,003,854 train and 111,540 val tokens" in proc.stdout
    assert written(tmp_path / "out") == one_shot(shakespeare, "char")

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 1000 + b"\xc3\x28")
    proc = cli(str(bad), "--out", str(tmp_path / "bad"), "--tokenizer", "byte")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "is not UTF-8 text" in proc.stderr
    assert not (tmp_path / "bad").exists()


# A small process runs prepare and reports its peak: a child's ru_maxrss starts at its parent's
# high-water mark (the fork), so measured straight from pytest it would say pytest's size.
MEASURE = ("import resource, subprocess, sys\n"
           "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
           "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mb(text_file: Path, out: Path, kind: str) -> float:
    """Peak RSS of one ``trainctl prepare`` process, in MB."""
    argv = [sys.executable, "-m", "trainctl", "prepare", str(text_file), "--out", str(out), "--tokenizer", kind]
    proc = subprocess.run([sys.executable, "-c", MEASURE, *argv], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=120, check=True)
    rc, kib = proc.stdout.split()
    assert rc == "0", f"trainctl prepare exited {rc}"
    return int(kib) / 1024  # KiB on Linux


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
@pytest.mark.parametrize("kind", ["char", "byte"])
def test_memory_does_not_grow_with_the_corpus(tmp_path, kind):
    """30 MB against 100 KB: the one-shot prepare grew by 1158 MB (char) and 119 MB (byte) here, the
    streaming one by about 20 and 8."""
    text = data.embedded_text()
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(text[:100_000], encoding="utf-8")
    with open(large, "w", encoding="utf-8") as f:
        for i in range(28):  # ~31 MB
            f.write(text if i % 2 else text.upper())
    growth = peak_rss_mb(large, tmp_path / "large", kind) - peak_rss_mb(small, tmp_path / "small", kind)
    assert growth < 40, f"peak RSS grew by {growth:.0f} MB for 30 MB more text"
