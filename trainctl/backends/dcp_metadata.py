"""DCP's ``.metadata`` (the plan of which file holds which piece of which tensor), written so that
it can be read back without trusting it, and read back with every field checked.

DCP itself writes the file with ``pickle.dump`` (protocol 4) and reads it with ``pickle.load``:
a crafted checkpoint would run whatever it holds. We do not write a restricted unpickler of our
own (one was bypassed with a dotted name: ``STACK_GLOBAL("...metadata", "os.system")``). Instead:

- **Writing**: once ``dcp.save`` is done, the coordinator writes the same ``Metadata`` again at
  pickle protocol 2, the protocol ``torch.save`` uses and the only one torch's weights-only
  unpickler reads (it has no ``STACK_GLOBAL``, ``FRAME`` or ``MEMOIZE``). Stock DCP still reads
  it (``pickle.load`` reads every protocol). The writer's temporary path is dropped from it.
- **Reading**: ``torch._weights_only_unpickler`` — what ``torch.load(weights_only=True)`` runs —
  with :func:`torch.serialization.safe_globals` naming DCP's metadata classes exactly
  (:data:`SAFE_GLOBALS`). It matches ``module.name`` as a whole against its table, calls only
  those classes and torch's own tensor rebuilders, and refuses everything else.
- **Checking** (:func:`check`) before DCP sees it: the types of every field; every
  ``relative_path`` a plain file name that the manifest lists, a regular file of the checkpoint,
  with ``offset + length`` inside it; no storage transforms; tensor sizes and chunk boxes
  consistent and bounded; the number of entries bounded. So a crafted plan cannot make DCP read
  outside the checkpoint (``/dev/zero``, ``../other-run``, a FIFO) or past a file's end.

A ``.metadata`` at pickle protocol 4 (written by DCP directly, or by trainctl before this
module) is refused with one line: it cannot be read without running its pickle.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import torch

from trainctl.kernel.checkpoint_files import NotVerified, open_checkpoint, open_regular, plain_name, read_manifest
from trainctl.kernel.errors import ConfigError

METADATA = ".metadata"
PROTOCOL = 2  # torch.save's, the weights-only unpickler's
MAX_METADATA_BYTES = 256 << 20  # a 70B model over 1024 ranks plans in tens of MB
MAX_ENTRIES = 1 << 22
MAX_NDIM = 8
MAX_NUMEL = 1 << 48


def safe_globals() -> list[Any]:
    """The classes a ``.metadata`` is made of, exactly (torch.Size, dtypes, layouts and memory
    formats are already the weights-only unpickler's own)."""
    from torch.distributed.checkpoint import metadata as m
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return [m.Metadata, m.StorageMeta, m.MetadataIndex, m.TensorStorageMetadata, m.BytesStorageMetadata,
            m.ChunkStorageMetadata, m.TensorProperties, m._MEM_FORMAT_ENCODING, _StorageInfo]


# --- writing --------------------------------------------------------------------------------------

def rewrite(directory: Path, metadata: Any) -> None:
    """``metadata`` (what ``dcp.save`` returned) as ``directory/.metadata`` at :data:`PROTOCOL`."""
    if getattr(metadata, "storage_meta", None) is not None:
        metadata.storage_meta.checkpoint_id = None  # the temporary directory it was written in: stale after the rename
    data = pickle.dumps(metadata, protocol=PROTOCOL)
    tmp = directory / f"{METADATA}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, directory / METADATA)


# --- reading --------------------------------------------------------------------------------------

def read(directory: Path) -> Any:
    """The checked ``Metadata`` of the sharded checkpoint ``directory``; ConfigError (one line,
    without the directory's name) when it is not one trainctl will read."""
    try:
        dir_fd = open_checkpoint(directory)
    except NotVerified as exc:
        raise ConfigError(str(exc)) from None
    try:
        data = _read_file(dir_fd)
        metadata = _unpickle(data)
        check(metadata, dir_fd)
    finally:
        os.close(dir_fd)
    return metadata


def _read_file(dir_fd: int) -> bytes:
    try:
        fd, size = open_regular(dir_fd, METADATA)
    except NotVerified as exc:
        raise ConfigError(str(exc)) from None
    try:
        if size > MAX_METADATA_BYTES:
            raise ConfigError(f"{METADATA} is over {MAX_METADATA_BYTES >> 20} MiB")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_METADATA_BYTES + 1)
    finally:
        os.close(fd)


def _unpickle(data: bytes) -> Any:
    from torch._weights_only_unpickler import Unpickler

    if data[:2] != bytes([pickle.PROTO[0], PROTOCOL]):
        old = len(data) > 1 and data[0] == pickle.PROTO[0] and data[1] > PROTOCOL
        raise ConfigError(
            f"{METADATA} is a pickle of protocol {data[1]}, which cannot be read without running it; "
            "trainctl reads sharded checkpoints it wrote itself (protocol 2): resume from a newer checkpoint"
            if old else f"{METADATA} is not a pickle of protocol {PROTOCOL} (the file is damaged or was tampered with)")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return Unpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - whatever hostile bytes raise (MemoryError, struct.error, ...) is one answer
        raise ConfigError(f"refused to read {METADATA}: {_reason(exc)} (the file may have been tampered with)") from None


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in text:
        text = text.split(" was not an allowed global")[0] + " is not a DCP metadata class"
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# --- checking -------------------------------------------------------------------------------------

def check(metadata: Any, dir_fd: int) -> None:
    """ConfigError naming the first field of ``metadata`` that a checkpoint trainctl wrote could
    not hold; the files it points at are those of the checkpoint open as ``dir_fd``."""
    problem = _problem(metadata, dir_fd)
    if problem:
        raise ConfigError(f"refused {METADATA}: {problem} (the file may have been tampered with)")


def _problem(md: Any, dir_fd: int) -> str | None:
    from torch.distributed.checkpoint import metadata as m

    if type(md) is not m.Metadata:
        return f"it holds a {type(md).__name__}, not DCP's Metadata"
    tensors, storage = md.state_dict_metadata, md.storage_data
    if type(tensors) is not dict or type(storage) is not dict:
        return "state_dict_metadata and storage_data must be tables"
    if len(tensors) > MAX_ENTRIES or len(storage) > MAX_ENTRIES:
        return f"more than {MAX_ENTRIES} entries"
    for fqn, item in tensors.items():
        problem = _entry_problem(fqn, item)
        if problem:
            return problem
    sizes = _listed_sizes(dir_fd)
    if isinstance(sizes, str):
        return sizes
    for index, info in storage.items():
        problem = _storage_problem(index, info, tensors, sizes)
        if problem:
            return problem
    if md.planner_data is not None and type(md.planner_data) is not dict:
        return "planner_data is not a table"
    if md.storage_meta is not None and type(md.storage_meta) is not m.StorageMeta:
        return "storage_meta is not DCP's StorageMeta"
    return None


def _entry_problem(fqn: Any, item: Any) -> str | None:
    from torch.distributed.checkpoint import metadata as m

    if type(fqn) is not str:
        return f"an entry's name is a {type(fqn).__name__}"
    if type(item) is m.BytesStorageMetadata:
        return None
    if type(item) is not m.TensorStorageMetadata:
        return f"{fqn!r} is a {type(item).__name__}, neither a tensor nor plain bytes"
    props = item.properties
    if type(props) is not m.TensorProperties or not isinstance(props.dtype, torch.dtype):
        return f"{fqn!r} has no tensor dtype"
    if not _shape(item.size) or math.prod(item.size) > MAX_NUMEL:
        return f"{fqn!r} has an impossible size {item.size!r}"
    if type(item.chunks) is not list or len(item.chunks) > MAX_ENTRIES:
        return f"{fqn!r}: chunks is not a list"
    for chunk in item.chunks:
        if type(chunk) is not m.ChunkStorageMetadata or not _shape(chunk.offsets) or not _shape(chunk.sizes):
            return f"{fqn!r}: a chunk is not an offset and a size"
        if not len(chunk.offsets) == len(chunk.sizes) == len(item.size) or any(
                o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, item.size)):
            return f"{fqn!r}: a chunk lies outside the tensor's size {tuple(item.size)}"
    return None


def _storage_problem(index: Any, info: Any, tensors: dict, sizes: dict[str, int]) -> str | None:
    from torch.distributed.checkpoint import metadata as m
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    if type(index) is not m.MetadataIndex or index.fqn not in tensors:
        return "storage_data names a piece of no entry"
    if index.offset is not None and not _shape(index.offset):
        return f"{index.fqn!r}: a piece's offset is not a tensor position"
    if type(info) is not _StorageInfo:
        return f"{index.fqn!r}: its storage is a {type(info).__name__}"
    name, offset, length = info.relative_path, info.offset, info.length
    if not plain_name(name):
        return f"{index.fqn!r} is stored in {name!r}, which is not a plain file name in the checkpoint"
    if name not in sizes:
        return f"{index.fqn!r} is stored in {name!r}, which the manifest does not list"
    if not (_count(offset) and _count(length)) or offset + length > sizes[name]:
        return f"{index.fqn!r}: bytes {offset!r}+{length!r} are not inside {name} ({sizes[name]} bytes)"
    if info.transform_descriptors:  # compression and the like: trainctl never writes them
        return f"{index.fqn!r}: storage transforms {info.transform_descriptors!r}"
    return None


def _listed_sizes(dir_fd: int) -> dict[str, int] | str:
    """{name: size} of the regular files the manifest lists (no link followed)."""
    try:
        files = read_manifest(dir_fd)["files"]
    except NotVerified as exc:
        return str(exc)
    sizes = {}
    for name in files:
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue  # a listed file that is gone: verification has said so already
        if stat.S_ISREG(info.st_mode):
            sizes[name] = info.st_size
    return sizes


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 62


def _shape(value: Any) -> bool:
    return isinstance(value, torch.Size) and len(value) <= MAX_NDIM and all(_count(n) for n in value)

