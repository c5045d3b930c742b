"""Token data for the ``gpt`` backend: preparing text into token files, loading them
memory-mapped, tokenizers, and the deterministic batch order.

A prepared dataset is a directory with ``train.bin`` and ``val.bin`` (flat ``uint16`` or
``uint32`` token ids, as nanoGPT writes them) and ``meta.json`` (tokenizer, vocabulary size,
dtype). Torch-free: ``trainctl prepare`` imports only numpy.

``prepare`` streams: it reads the text ``CHUNK_CHARS`` characters at a time and writes tokens as
they come, so its memory does not grow with the corpus, and its files are the same bytes as
``tokenize`` + ``split`` of the whole text would give.
"""

from __future__ import annotations

import json
import lzma
import os
import pickle
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from trainctl.kernel.errors import ConfigError

EMBEDDED = "tinyshakespeare.txt.xz"
VAL_FRACTION = 0.1  # nanoGPT's shakespeare_char split: the last 10% of the text
CHUNK_CHARS = 1 << 20  # text prepare holds at a time (<= 4 MB as a str): its memory, whatever the corpus size
COPY_BYTES = 1 << 20  # the buffer that moves the val tail out of the token file
UNICODE_CODES = 0x110000


class Tokenizer:
    """Encode and decode for the three kinds ``prepare`` makes: ``char``, ``byte``, ``gpt2``."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.kind = meta["tokenizer"]
        self.vocab_size = int(meta["vocab_size"])
        if self.kind == "char":
            self.chars: str = meta["chars"]
            self.stoi = {c: i for i, c in enumerate(self.chars)}
        elif self.kind == "gpt2":
            self._tiktoken = _tiktoken()
        elif self.kind != "byte":
            raise ConfigError(f"meta.json names an unknown tokenizer {self.kind!r}; expected char, byte or gpt2")

    def encode(self, text: str) -> list[int]:
        if self.kind == "char":
            missing = sorted({c for c in text if c not in self.stoi})
            if missing:
                raise ConfigError(f"text has characters outside the vocabulary: {''.join(missing)!r}")
            return [self.stoi[c] for c in text]
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        return self._tiktoken.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        if self.kind == "char":
            return "".join(self.chars[i] for i in ids)
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return self._tiktoken.decode(ids)


@dataclass(frozen=True, slots=True)
class TokenData:
    train: np.ndarray  # flat token ids (memory-mapped for prepared data)
    val: np.ndarray
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def embedded_text() -> str:
    """The tiny-shakespeare corpus shipped inside the package (xz, 364 KB)."""
    with resources.files("trainctl.data").joinpath(EMBEDDED).open("rb") as f:
        return lzma.decompress(f.read()).decode("utf-8")


def tokenize(text: str, kind: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Text → (token ids, meta). ``char``: one id per distinct character, sorted (nanoGPT)."""
    if kind == "char":
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        uniq, ids = np.unique(codes, return_inverse=True)
        chars = "".join(chr(c) for c in uniq)
        meta = {"tokenizer": "char", "vocab_size": len(chars), "chars": chars}
    elif kind == "byte":
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        meta = {"tokenizer": "byte", "vocab_size": 256}
    elif kind == "gpt2":
        enc = _tiktoken()
        ids = np.array(enc.encode_ordinary(text), dtype=np.int64)
        meta = {"tokenizer": "gpt2", "vocab_size": enc.n_vocab}
    else:
        raise ConfigError(f"unknown tokenizer {kind!r}; choose char, byte or gpt2")
    dtype = _token_dtype(meta["vocab_size"])
    meta["dtype"] = dtype.name
    return ids.astype(dtype), meta


def split(ids: np.ndarray, val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    n = _train_length(len(ids), val_fraction)
    return ids[:n], ids[n:]


def prepare(
    text_file: Path, out_dir: Path, kind: str, val_fraction: float = VAL_FRACTION, chunk_chars: int = CHUNK_CHARS,
) -> dict[str, Any]:
    """Write ``train.bin``, ``val.bin`` and ``meta.json`` for a text file; returns the meta.

    The tokens stream into ``.train.bin.tmp`` (the split lies a fraction of the *token* count
    from the end, unknown until the last chunk); the tail past the split then moves into
    ``.val.bin.tmp``, and the three files replace the old ones only once all are written, so a
    failure leaves the previous outputs as they were and no temporary file behind."""
    if kind not in ("char", "byte", "gpt2"):
        raise ConfigError(f"unknown tokenizer {kind!r}; choose char, byte or gpt2")
    encode, meta = _streaming_encoder(text_file, kind, chunk_chars)
    dtype = _token_dtype(meta["vocab_size"])
    meta["dtype"] = dtype.name
    made_dir = not out_dir.exists()
    tmp = {name: out_dir / f".{name}.tmp" for name in ("train.bin", "val.bin", "meta.json")}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_tokens = 0
        with open(tmp["train.bin"], "wb") as f:
            for ids in encode(_text_chunks(text_file, chunk_chars)):
                ids.astype(dtype, copy=False).tofile(f)
                n_tokens += len(ids)
        if n_tokens == 0:
            raise _empty(text_file)
        n_train = _train_length(n_tokens, val_fraction)
        if n_tokens - n_train < 2:
            raise ConfigError(f"{text_file} is too short to hold a validation split")
        _move_tail(tmp["train.bin"], tmp["val.bin"], n_train * dtype.itemsize)
        meta.update(source=str(text_file), train_tokens=n_train, val_tokens=n_tokens - n_train)
        tmp["meta.json"].write_text(json.dumps(meta, indent=1))
        for name, path in tmp.items():
            os.replace(path, out_dir / name)
    except OSError as exc:
        raise ConfigError(f"cannot write {out_dir}: {exc}") from None
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if made_dir and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
    return meta


def _empty(text_file: Path) -> ConfigError:
    return ConfigError(f"{text_file} is empty; give a text file with some content")


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _train_length(n_tokens: int, val_fraction: float) -> int:
    return int(n_tokens * (1 - val_fraction))


def _text_chunks(text_file: Path, chunk_chars: int) -> Iterator[str]:
    r"""The text, ``chunk_chars`` characters at a time. Text mode decodes incrementally (a chunk
    never ends inside a UTF-8 sequence) and translates newlines as ``read_text`` does, a
    ``\r\n`` across a chunk edge included."""
    done = 0
    try:
        with open(text_file, encoding="utf-8") as f:
            while chunk := f.read(chunk_chars):
                yield chunk
                done += len(chunk)
    except UnicodeDecodeError as exc:
        where = f"in the characters after the first {done:,}"
        raise ConfigError(f"{text_file} is not UTF-8 text: {exc.reason} {where}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {text_file}: {exc}") from None


Encoder = Callable[[Iterable[str]], Iterator[np.ndarray]]


def _streaming_encoder(text_file: Path, kind: str, chunk_chars: int) -> tuple[Encoder, dict[str, Any]]:
    """(chunks → token id arrays, meta without dtype). ``char`` reads the whole file once first:
    its vocabulary is every character in it (so a pipe will not do)."""
    if kind == "byte":
        return _byte_ids, {"tokenizer": "byte", "vocab_size": 256}
    if kind == "gpt2":
        enc = _tiktoken()
        return (lambda chunks: _bpe_ids(chunks, enc)), {"tokenizer": "gpt2", "vocab_size": enc.n_vocab}
    if not text_file.is_file():
        raise ConfigError(f"{text_file} is not a regular file: the char tokenizer reads it twice; save it to a file first")
    seen = np.zeros(UNICODE_CODES, dtype=bool)
    n_chars = 0
    for chunk in _text_chunks(text_file, chunk_chars):
        seen[_code_points(chunk)] = True
        n_chars += len(chunk)
    if n_chars == 0:
        raise _empty(text_file)
    codes = np.flatnonzero(seen)
    chars = "".join(chr(c) for c in codes)
    ids_of = np.zeros(UNICODE_CODES, dtype=_token_dtype(len(chars)))  # code point → id, sorted as np.unique sorts
    ids_of[codes] = np.arange(len(codes))

    changed = ConfigError(f"{text_file} changed while it was being prepared; run trainctl prepare again")

    def char_ids(chunks: Iterable[str]) -> Iterator[np.ndarray]:
        done = 0
        for chunk in chunks:
            points = _code_points(chunk)
            done += len(points)
            if done > n_chars or not seen[points].all():
                raise changed
            yield ids_of[points]
        if done != n_chars:
            raise changed

    return char_ids, {"tokenizer": "char", "vocab_size": len(chars), "chars": chars}


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _byte_ids(chunks: Iterable[str]) -> Iterator[np.ndarray]:
    for chunk in chunks:
        yield np.frombuffer(chunk.encode("utf-8"), dtype=np.uint8)


def _bpe_ids(chunks: Iterable[str], enc: Any) -> Iterator[np.ndarray]:
    """tiktoken ids of the concatenated chunks, exactly as one ``encode_ordinary`` of the whole
    text: each chunk is encoded up to its last safe cut (``bpe_cut``), the rest waits for the next.
    A text with no such cut at all (no line break, no space between two letters) is held whole."""
    pending = ""
    for chunk in chunks:
        text = pending + chunk
        cut = bpe_cut(text, len(pending))
        if cut:
            yield np.array(enc.encode_ordinary(text[:cut]), dtype=np.int64)
        pending = text[cut:]
    if pending:
        yield np.array(enc.encode_ordinary(pending), dtype=np.int64)


_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def bpe_cut(text: str, start: int = 0) -> int:
    r"""The last index ``i`` (past ``start``, with a character on either side) where the gpt2
    encoding of ``text`` is the encoding of ``text[:i]`` followed by that of ``text[i:]``, or 0.

    tiktoken encodes each piece of its pre-tokenizing regex apart (gpt2's, tiktoken's r50k
    pattern: ``'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s``), so a
    cut between two pieces that both texts find alike changes nothing. Two such places:

    - right after a ``\n`` with a non-space before and after it (``x\ny``). The whole text splits
      ``x|\n|y``: no piece but a whitespace one holds ``\n``, ``\s+(?!\S)`` cannot end before
      ``y``, so ``\s`` takes the ``\n`` alone; the front text ends ``x|\n`` (``\s++$``), the
      back text starts at ``y``. A longer run (``\n\n``, `` \n``) would not do: the whole text
      splits it before its last character, the front text's ``\s++$`` keeps it whole.
    - right before a space between two ASCII letters (``a b``): ``a`` ends a letter run (or a
      ``'s``-style contraction, which looks no further than two letters), `` b`` starts one
      either way. For text without line breaks.

    ``str.isspace`` holds for every character that the regex's ``\s`` (Unicode White_Space)
    matches, and for four more, which only makes it refuse some safe cuts. Only separators from
    ``start - 1`` on are looked at: the caller searched ``text[:start]`` before, all but its last
    character, which needs the next one to be judged."""
    lo = max(start - 1, 1)
    j = text.rfind("\n", lo, len(text) - 1)
    while j >= lo:
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            return j + 1
        j = text.rfind("\n", lo, j)
    j = text.rfind(" ", lo, len(text) - 1)
    while j >= lo:
        if text[j - 1] in _ASCII_LETTERS and text[j + 1] in _ASCII_LETTERS:
            return j
        j = text.rfind(" ", lo, j)
    return 0


def _move_tail(src: Path, dst: Path, offset: int) -> None:
    """Copy ``src`` from byte ``offset`` on into ``dst``, then cut it off ``src``."""
    with open(src, "r+b") as f, open(dst, "wb") as out:
        f.seek(offset)
        shutil.copyfileobj(f, out, COPY_BYTES)
        f.truncate(offset)


def load(path: str) -> TokenData:
    """The embedded corpus (``path == ""``) or a prepared directory, memory-mapped."""
    if not path:
        ids, meta = tokenize(embedded_text(), "char")
        train, val = split(ids)
        return TokenData(train=train, val=val, meta=meta | {"source": "embedded:tinyshakespeare"})
    root = Path(path)
    if root.is_file():
        raise ConfigError(f"data.path {root} is a file; prepare it first: trainctl prepare {root} --out DIR, then data.path = DIR")
    meta_file = root / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
    elif (root / "meta.pkl").exists():
        meta = nanogpt_meta(root / "meta.pkl")
    else:
        raise ConfigError(f"no prepared data in {root} (meta.json missing); run: trainctl prepare TEXT_FILE --out {root}")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    arrays = []
    for name in ("train.bin", "val.bin"):
        file = root / name
        if not file.exists() or file.stat().st_size < dtype.itemsize:
            raise ConfigError(f"{file} is missing or empty; run trainctl prepare again")
        arrays.append(np.memmap(file, dtype=dtype, mode="r"))
    return TokenData(train=arrays[0], val=arrays[1], meta=meta)


class _PlainUnpickler(pickle.Unpickler):
    """Dicts, lists, strings and numbers only: any class or function in the pickle is refused
    before it can run. No global is ever resolved, so there is no allow-list to get around;
    nanoGPT writes meta.pkl at protocol 4, which torch's weights-only unpickler cannot read."""

    def find_class(self, module: str, name: str) -> Any:
        raise ConfigError(f"refused: the pickle names {module}.{name}; only plain values are read")


def nanogpt_meta(path: Path) -> dict[str, Any]:
    """A nanoGPT ``meta.pkl`` (``prepare.py`` of shakespeare_char: vocab_size, itos, stoi) as our
    meta: a character vocabulary in id order, uint16 tokens."""
    try:
        with open(path, "rb") as f:
            raw = _PlainUnpickler(f).load()
        itos = raw["itos"]
        chars = "".join(itos[i] for i in range(int(raw["vocab_size"])))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, MemoryError, OverflowError) as exc:
        raise ConfigError(f"{path} is not a nanoGPT character meta.pkl ({type(exc).__name__}: {exc})") from None
    return {"tokenizer": "char", "vocab_size": len(chars), "chars": chars, "dtype": "uint16", "source": str(path.parent)}


def batch_starts(n_tokens: int | np.ndarray, block_size: int, batch_size: int, *key: int) -> np.ndarray:
    """Start offsets of a batch: a pure function of ``key`` (seed, step, micro-batch), so a
    resumed run or another number of ranks sees exactly the same batches. ``n_tokens`` per row
    ((B,), a mixture's rows from several sources) draws the same numbers as one int would."""
    rng = np.random.default_rng(key)
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def _tiktoken() -> Any:
    try:
        import tiktoken

        return tiktoken.get_encoding("gpt2")
    except ImportError:
        raise ConfigError("the gpt2 tokenizer needs tiktoken: pip install 'trainctl[bpe]'") from None
    except Exception as exc:  # tiktoken downloads its BPE files on first use
        raise ConfigError(f"tiktoken's gpt2 files are not available here ({type(exc).__name__}); use --tokenizer char or byte") from None
