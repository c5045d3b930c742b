"""The run directory belongs to the user who runs training, and to one live run at a time.

    prepare(out_dir, main=...)   make it (0700) or refuse it when someone else could write in it
    claim(out_dir, main=...)     prepare, then take RUN_DIR/control/lock (rank 0): a RunDir
    RunDir.check()               each control poll: is the directory (and the lock) still ours?
    open_append / write_atomic / read_regular
                                 every run file is opened without following symlinks, temporary
                                 files exclusively, and reads take regular files of bounded size

Who is trusted: the user running training (and root). Another local user who can write in the
run directory could plant symlinks (``events.jsonl -> ~/.bashrc``), a checkpoint to be resumed, or
a FIFO that blocks a read forever; so a directory owned by someone else or writable by group or
others is refused before anything is written, and directories trainctl makes are private. The
parents of the run directory are not checked: whoever can rename entries there can swap the whole
directory, which no check here could prevent (use a path under your own home or scratch space).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from trainctl.hooks import hookimpl
from trainctl.hooks.events import Control, RunView
from trainctl.kernel.errors import ConfigError

CONTROL = "control"
LOCK = "lock"
PRIVATE = 0o600
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeFile(OSError):
    """A run file that is a symlink, not a regular file, or too large to be what it claims."""


# --- the directory ------------------------------------------------------------------------------

def prepare(out_dir: Path, *, main: bool = True) -> None:
    """Create ``out_dir`` private to the user, or check that nobody else can write in it; rank 0
    also makes ``control/``. A problem is a one-line ConfigError naming the path and the fix."""
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # parents get the usual mode
    except OSError as exc:
        raise ConfigError(f"out dir {out_dir} is not writable ({exc.strerror}); choose another with --out DIR") from None
    _check_owned(out_dir, "run directory", follow=True)
    control = out_dir / CONTROL
    if main:
        try:
            control.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"out dir {out_dir} is not writable ({exc.strerror}); choose another with --out DIR") from None
    if os.path.lexists(control):
        _check_owned(control, "control directory", follow=False, writers=_reach(out_dir))
    try:  # e.g. a directory of ours on a read-only mount
        probe = out_dir / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, PRIVATE))
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"out dir {out_dir} is not writable ({exc.strerror}); choose another with --out DIR") from None


def check_read_back(path: Path, what: str, out_dir: Path) -> None:
    """A directory the run reads back from (the checkpoint plugin's, wherever it is configured):
    if it exists, the user's own and not writable by anyone who can reach it, else a one-line
    ConfigError. Inside the run directory only those who may enter it reach it; elsewhere anyone."""
    if not os.path.lexists(path):
        return
    inside = Path(os.path.realpath(path)).is_relative_to(os.path.realpath(out_dir))
    _check_owned(path, what, follow=True, writers=_reach(out_dir) if inside else stat.S_IWGRP | stat.S_IWOTH)


def _reach(out_dir: Path) -> int:
    """Who may write inside ``out_dir`` and matter: group or others writing in a folder there
    counts only if they can enter the run directory (with umask 002 the checkpoint plugin's
    folder is group-writable, harmless inside a 0700 run directory)."""
    mode = os.stat(out_dir).st_mode
    return (stat.S_IWGRP if mode & stat.S_IXGRP else 0) | (stat.S_IWOTH if mode & stat.S_IXOTH else 0)


def _check_owned(path: Path, what: str, *, follow: bool, writers: int = stat.S_IWGRP | stat.S_IWOTH) -> os.stat_result:
    """``path``'s stat if it is a directory of the user's (or root's) that none of ``writers``
    (group, others) may write in; else a one-line ConfigError."""
    uid = os.getuid()
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode):
        writers = stat.S_IWGRP | stat.S_IWOTH  # a folder elsewhere: reachable by anyone
        if not follow:
            raise ConfigError(f"{what} {path} is a symlink; remove it (trainctl makes {path.name}/ itself) or choose another --out")
        if link.st_uid not in (uid, 0):
            raise ConfigError(f"{what} {path} is a symlink made by uid {link.st_uid}, not you (uid {uid}); "
                              "choose another --out")
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a directory; choose another --out")
    if st.st_uid not in (uid, 0):
        raise ConfigError(f"{what} {path} belongs to uid {st.st_uid}, not you (uid {uid}): its owner could plant "
                          "symlinks or checkpoints there; choose another --out, or chown it to yourself")
    if st.st_mode & writers:
        raise ConfigError(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): they "
                          f"could plant symlinks or checkpoints there; chmod go-w {path}, or choose another --out")
    return st


def claim(out_dir: Path, *, main: bool = True, plugins: Sequence[str] = ()) -> RunDir:
    """Prepare ``out_dir`` and, on rank 0, lock it for this run (a second live run there, with or
    without the controller plugin, is a ConfigError). Release with :meth:`RunDir.release`."""
    prepare(out_dir, main=main)
    return RunDir(out_dir, main=main, plugins=list(plugins))


class RunDir:
    """The run directory of a live run: the lock (rank 0) and a cheap check that it still exists.

    Registered with the run's plugin manager; at a control poll, at most once a second (a stat on
    a network filesystem can take milliseconds), ``check`` stats the directory and the lock
    against their inodes at the start."""

    INTERVAL_S = 1.0

    def __init__(self, out_dir: Path, *, main: bool, plugins: list[str]) -> None:
        self.out_dir = out_dir
        here = os.stat(out_dir)
        self.inode = (here.st_dev, here.st_ino)
        self.lock_path = out_dir / CONTROL / LOCK
        self.lock: int | None = None
        self.lock_inode: tuple[int, int] | None = None
        self.checked = time.monotonic()
        if main:
            self.lock = _lock(self.lock_path, out_dir, plugins)
            held = os.fstat(self.lock)
            self.lock_inode = (held.st_dev, held.st_ino)
            for stale in (out_dir / CONTROL).glob("cmd-*.json"):  # for a run that is gone: never replay them
                stale.unlink(missing_ok=True)

    def check(self) -> str | None:
        """None while the directory and the lock are the ones this run started with, else why not."""
        try:
            here = os.stat(self.out_dir)
        except OSError:
            return f"the run directory {self.out_dir} was deleted or moved while the run was going"
        if (here.st_dev, here.st_ino) != self.inode:
            return f"the run directory {self.out_dir} was replaced by another while the run was going"
        if self.lock_inode is not None:
            try:
                held = os.stat(self.lock_path)
            except OSError:
                held = None
            if held is None or (held.st_dev, held.st_ino) != self.lock_inode:
                return f"the run's lock {self.lock_path} was removed: another run could start there"
        return None

    @hookimpl
    def trainctl_control(self, view: RunView) -> Control | None:
        now = time.monotonic()
        if now - self.checked < self.INTERVAL_S:
            return None
        self.checked = now
        problem = self.check()
        return Control(stop=True, failed=True, reason=problem) if problem else None

    def release(self) -> None:
        if self.lock is not None:
            os.close(self.lock)  # releases the flock: `trainctl ctl` now sees no live run
            self.lock = None

    def __del__(self) -> None:  # a Run dropped after a failed setup: free the directory
        self.release()


def _lock(path: Path, out_dir: Path, plugins: list[str]) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, PRIVATE)
    except OSError as exc:  # ELOOP: a symlink, never followed
        why = "a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise ConfigError(f"cannot open the run lock {path} ({why}); remove it (a run makes it) or choose another --out") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path} is not a regular file; remove it or choose another --out")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            import gc

            gc.collect()  # a Run of this process that failed to set up may hold it until collected
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise ConfigError(
                    f"another run is live in {out_dir} ({holder}); stop it first (trainctl ctl {out_dir} stop) "
                    "or choose another --out"
                ) from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3), "plugins": plugins}
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


# --- files --------------------------------------------------------------------------------------

def open_append(path: Path, *, text: bool = False) -> IO:
    """``path`` opened for appending (created private if missing), never through a symlink. A
    last line cut short by a crash is ended first, so the next line starts on its own."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | NOFOLLOW, PRIVATE)
    try:
        size = _regular(fd, path).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8") if text else os.fdopen(fd, "ab")


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE) -> None:
    """Replace ``path`` with ``data``: a temporary file created exclusively beside it (never an
    existing file or a symlink), then ``os.replace``, so a reader sees the old or the new content.
    No fsync: the callers' files describe a live process and the old content is as good."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # replaces a symlink at ``path`` itself, never its target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a symlink, FIFO or device) of at most
    ``limit`` bytes; never blocks (a FIFO opens at once with O_NONBLOCK and is refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW)
    try:
        size = _regular(fd, path).st_size
        if size > limit:
            raise UnsafeFile(errno.EFBIG, f"larger than {limit} bytes ({size})", str(path))
        return os.read(fd, limit + 1)[:limit]
    finally:
        os.close(fd)


def _regular(fd: int, path: Path) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(errno.EINVAL, "not a regular file", str(path))
    return st

