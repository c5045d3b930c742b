"""Token data for the ``gpt`` backend: preparing text into token files, loading them
memory-mapped, tokenizers, and the deterministic batch order.

A prepared dataset is a directory with ``train.bin`` and ``val.bin`` (flat ``uint16`` or
``uint32`` token ids, as nanoGPT writes them) and ``meta.json`` (tokenizer, vocabulary size,
dtype). Torch-free: ``trainctl prepare`` imports only numpy.
"""

from __future__ import annotations

import json
import lzma
import os
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from trainctl.kernel.errors import ConfigError

EMBEDDED = "tinyshakespeare.txt.xz"
VAL_FRACTION = 0.1  # nanoGPT's shakespeare_char split: the last 10% of the text


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
    dtype = np.uint16 if meta["vocab_size"] <= 2**16 else np.uint32
    meta["dtype"] = np.dtype(dtype).name
    return ids.astype(dtype), meta


def split(ids: np.ndarray, val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]


def prepare(text_file: Path, out_dir: Path, kind: str, val_fraction: float = VAL_FRACTION) -> dict[str, Any]:
    """Write ``train.bin``, ``val.bin`` and ``meta.json`` for a text file; returns the meta."""
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {text_file}: {exc}") from None
    if not text:
        raise ConfigError(f"{text_file} is empty; give a text file with some content")
    ids, meta = tokenize(text, kind)
    train, val = split(ids, val_fraction)
    if len(val) < 2:
        raise ConfigError(f"{text_file} is too short to hold a validation split")
    meta.update(source=str(text_file), train_tokens=len(train), val_tokens=len(val))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train.bin", train), ("val.bin", val)):
        tmp = out_dir / f".{name}.tmp"
        arr.tofile(tmp)
        os.replace(tmp, out_dir / name)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


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


def batch_starts(n_tokens: int, block_size: int, batch_size: int, *key: int) -> np.ndarray:
    """Start offsets of a batch: a pure function of ``key`` (seed, step, micro-batch), so a
    resumed run or another number of ranks sees exactly the same batches."""
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
