"""The files of a checkpoint directory, shared by the checkpoint plugin, resume, ``trainctl
sample``/``eval`` and the eval worker: names, the sha256 manifest, verification, and the
atomic seal (every file private, fsynced, the manifest last, rename into place).

A directory is a checkpoint only once its manifest is in place and every file it lists matches
its sha256: a kill at any instant leaves complete checkpoints under ``step-*`` names and, at
most, a ``.tmp-*`` directory that the next run removes.

A checkpoint may come from someone else (a job submitted to the eval worker, a run directory
copied from elsewhere), so reading one trusts nothing in it: the manifest must list plain file
names (no ``/``, no ``..``), checked before anything is opened, and must include the files every
checkpoint has (:data:`REQUIRED`); each file is opened relative to the directory's descriptor
without following symbolic links and must be a regular file (a FIFO or a device would block or
never end). :func:`snapshot` copies the bytes it hashes into a private directory, so what is
loaded afterwards is exactly what was verified, whatever happens to the original meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"  # in-progress writes and checkpoints being removed
#: Files every checkpoint written by the kernel holds (the resolved config and the kernel state);
#: a manifest that leaves them out (an empty file list, say) does not verify.
REQUIRED = ("config.toml", "kernel.json")
#: A sharded checkpoint (FSDP, written through PyTorch Distributed Checkpoint) holds its weights
#: and optimizer state as DCP's coordinator file and one ``__RANK_0.distcp`` file per rank:
#: plain names, listed and hashed like every other file.
SHARDED_METADATA = ".metadata"
SHARD_SUFFIX = ".distcp"
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # a checkpoint is its owner's alone (make_private)
MAX_MANIFEST_BYTES = 1 << 20
_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")


class NotVerified(Exception):
    """The checkpoint is incomplete, corrupt or not made of plain files (the message says which)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_name(name: object) -> bool:
    """A file name that stays inside its directory: no separator, no ``.``/``..``, no NUL."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..")
            and "/" not in name and "\0" not in name)


def holds_weights(files: dict | list) -> bool:
    """The listed files include weights: safetensors, or a sharded checkpoint's metadata and shards."""
    return (any(name.endswith(".safetensors") for name in files)
            or (SHARDED_METADATA in files and any(name.endswith(SHARD_SUFFIX) for name in files)))


def is_sharded(files: dict | list) -> bool:
    return SHARDED_METADATA in files


def open_regular(dir_fd: int, name: str, missing: str = "") -> tuple[int, int]:
    """(descriptor, size) of the regular file ``name`` in the directory ``dir_fd``; never follows
    a symbolic link and never blocks (O_NONBLOCK: opening a FIFO returns at once, then is refused).
    NotVerified if it is not one (``missing``: the message when it does not exist)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise NotVerified(missing or f"{name} is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotVerified(f"{name} is a symbolic link; a checkpoint holds only regular files") from None
        raise NotVerified(f"{name} cannot be opened ({exc.strerror})") from None
    mode, size = (st := os.fstat(fd)).st_mode, st.st_size
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotVerified(f"{name} is not a regular file; a checkpoint holds only regular files")
    return fd, size


def read_manifest(dir_fd: int, required: tuple[str, ...] = REQUIRED) -> dict:
    """The manifest of the checkpoint open as ``dir_fd``, checked: ``step`` a non-negative integer,
    ``files`` plain names with sha256 digests, ``required`` among them."""
    fd, size = open_regular(dir_fd, MANIFEST, missing="no manifest (incomplete)")
    try:
        if size > MAX_MANIFEST_BYTES:
            raise NotVerified(f"unreadable manifest (over {MAX_MANIFEST_BYTES} bytes)")
        data = _read(fd, size)
    finally:
        os.close(fd)
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise NotVerified(f"unreadable manifest ({type(exc).__name__}: {str(exc)[:200]})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    step = manifest.get("step") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise NotVerified('unreadable manifest (it must be {"step": N, "files": {NAME: SHA256}})')
    for name, digest in files.items():
        if not plain_name(name) or name == MANIFEST:
            raise NotVerified(f"the manifest lists {name!r}, which is not a plain file name in the checkpoint")
        if not isinstance(digest, str) or len(digest) != 64 or not _HEX.issuperset(digest):
            raise NotVerified(f"the manifest's sha256 of {name} is not a sha256")
    missing = [name for name in required if name not in files]
    if missing:
        raise NotVerified(f"the manifest does not list {', '.join(missing)} (incomplete)")
    return manifest


def check_files(dir_fd: int, manifest: dict, sink: Callable[[str, bytes], None] | None = None,
                max_bytes: int | None = None) -> None:
    """Hash every file the manifest lists; ``sink(name, chunk)`` receives exactly the bytes hashed."""
    opened = []
    try:
        for name in manifest["files"]:
            opened.append((name, *open_regular(dir_fd, name)))
        total = sum(size for _, _, size in opened)
        if max_bytes is not None and total > max_bytes:
            raise NotVerified(f"the checkpoint holds {total} bytes, over the limit of {max_bytes}")
        for name, fd, size in opened:
            digest = hashlib.sha256()
            left = size  # never past the size seen when it was opened: a growing file is cut there
            while left:
                chunk = os.read(fd, min(_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                digest.update(chunk)
                if sink is not None:
                    sink(name, chunk)
            if digest.hexdigest() != manifest["files"][name]:
                raise NotVerified(f"{name} does not match its sha256")
    finally:
        for _, fd, _ in opened:
            os.close(fd)


def open_checkpoint(directory: Path) -> int:
    """A descriptor of the directory (the path itself may be a link the user made; nothing in it
    may be)."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotVerified("no such directory") from None
    except OSError as exc:
        raise NotVerified(f"not a readable directory ({exc.strerror})") from None


def verify(directory: Path, required: tuple[str, ...] = REQUIRED) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    try:
        dir_fd = open_checkpoint(directory)
    except NotVerified as exc:
        return str(exc)
    try:
        check_files(dir_fd, read_manifest(dir_fd, required))
    except NotVerified as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    finally:
        os.close(dir_fd)
    return None


def snapshot(dir_fd: int, dest: Path, *, required: tuple[str, ...] = REQUIRED, max_bytes: int | None = None) -> dict:
    """Copy the checkpoint open as ``dir_fd`` into the new private directory ``dest``, verifying
    the very bytes that are written; the manifest. Raises NotVerified (``dest`` is then removed)."""
    manifest = read_manifest(dir_fd, required)
    dest.mkdir(mode=0o700)
    files = {}
    try:
        try:
            for name in manifest["files"]:
                files[name] = open(dest / name, "xb")  # every listed file, empty ones too
            check_files(dir_fd, manifest, lambda name, chunk: files[name].write(chunk), max_bytes)
        finally:
            for f in files.values():
                f.close()
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return manifest


@contextmanager
def named_as(copy: Path, original: Path) -> Iterator[None]:
    """A ConfigError raised while a snapshot is loaded names the checkpoint the user gave, not
    the private copy."""
    from trainctl.kernel.errors import ConfigError

    try:
        yield
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(str(copy), str(original))) from None


def _read(fd: int, size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = os.read(fd, min(_CHUNK, left))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: (step_of(p), p.name))  # by number: step-1000000 after step-999999


def seal(tmp: Path, final: Path, step: int, reason: str) -> None:
    """Make every file private, hash and fsync it, write the manifest last, rename into place."""
    make_private(tmp)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    for file in files:
        fsync_path(tmp / file)
    manifest = {"step": step, "reason": reason, "files": files, "time": time.time()}
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, PRIVATE_FILE)  # exactly 0600, whatever the umask
        f.write(json.dumps(manifest, indent=1))
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)
    if final.exists():  # from an abandoned branch (--resume never or an older PATH), or corrupt
        discard(final)
    os.rename(tmp, final)
    fsync_path(final.parent)


def make_private(directory: Path) -> None:
    """``directory`` and every directory under it 0700, every file 0600, whatever the umask and
    whoever wrote them: torch.save, DCP's shards and ``.metadata``, safetensors and
    save_pretrained create their files 0666 & ~umask (0644 under the usual 022), readable by
    every local user wherever ``plugin.checkpoint.dir`` puts the checkpoint. Called before the
    seal's rename, once every rank has written; links are not followed."""
    os.chmod(directory, PRIVATE_DIR)
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(parent, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                os.chmod(path, PRIVATE_DIR)
            elif stat.S_ISREG(mode):
                os.chmod(path, PRIVATE_FILE)


def discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed out of the ``step-*`` names first (atomic), so a
    crash halfway through the deletion never leaves a partial checkpoint under a real name."""
    trash = path.with_name(f"{TMP_PREFIX}old-{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix(PREFIX))
    except ValueError:
        return 0
