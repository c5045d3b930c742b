"""Which files the eval worker may read: only those under its configured root directories.

Paths are compared after resolving every symlink (``realpath``), so a link inside a root that
points outside it is outside. That check answers a submission (403) and confines the paths a
checkpoint's config names; the checkpoint itself is then opened by :meth:`Roots.open_dir`, one
component at a time from the root without following links, so a directory swapped for a link
after the check is refused rather than followed.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainctl.kernel.errors import ConfigError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class Roots:
    def __init__(self, dirs: list[Path]) -> None:
        resolved = []
        for d in dirs:
            if not d.is_dir():
                raise ConfigError(f"--root {d} is not a directory; give an existing directory that holds run dirs")
            resolved.append(Path(os.path.realpath(d)))
        self.dirs = resolved

    def resolve(self, path: str) -> Path | None:
        """The real path of ``path`` if it lies under a root, else None."""
        real = Path(os.path.realpath(path))
        return real if self.contains(real) else None

    def contains(self, real: Path) -> bool:
        return any(real == root or real.is_relative_to(root) for root in self.dirs)

    def open_dir(self, real: Path) -> int:
        """A descriptor of the directory ``real`` (a real path under a root), reached from the
        root without following any link: OSError if some component is no longer a directory."""
        root = next((r for r in self.dirs if real == r or real.is_relative_to(r)), None)
        if root is None:
            raise PermissionError(f"{real} is outside the worker's roots")
        fd = os.open(root, _DIR_FLAGS)
        try:
            for part in real.relative_to(root).parts:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def __str__(self) -> str:
        return ", ".join(str(d) for d in self.dirs)
