"""Which checkpoints the eval worker may read: only those under its configured root directories.

Paths are compared after resolving every symlink (``realpath``), so a link inside a root that
points outside it is outside. The check runs when a job is submitted and again just before it
is read, so a link swapped in between does not escape either.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainctl.kernel.errors import ConfigError


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
        return real if any(real == root or real.is_relative_to(root) for root in self.dirs) else None

    def __str__(self) -> str:
        return ", ".join(str(d) for d in self.dirs)
