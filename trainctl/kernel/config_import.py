"""What the config importers (``trainctl config import-trl`` / ``import-nanogpt``) share: the
source file read with a bound, and the values parsed from it checked for size and depth before
anything converts, prints or writes them. Torch-free.

A file to convert may come from anywhere (a repository, a colleague, a download), and a
converter must answer quickly and in one line whatever it holds. The parsers are the standard
ones (``yaml.safe_load``, ``ast``: nothing executed), but they are not bounded by themselves:

- **Size.** Pure-Python YAML parses about 100 KiB a second here (a 300 MB file ran past a
  minute), so the file is refused past :data:`MAX_SOURCE_BYTES` without being read further.
  TRL and nanoGPT configs are a few KB; the cap leaves room for an inline chat template.
- **Depth.** ``[[[[...]]]]`` nested 100000 deep makes either parser raise RecursionError or
  MemoryError; the callers turn every parser failure into one line. What parses is then walked
  without recursion by :func:`check_values`: at most :data:`MAX_DEPTH` levels.
- **Expansion.** A YAML alias (``*a``) shares one value many times; nested aliases in a few
  hundred bytes stand for billions of items, which ``repr`` or the TOML writer would expand (and
  ``&a [*a]`` is a cycle, which they would follow forever). :func:`check_values` counts a shared
  value every time it appears and stops at :data:`MAX_ITEMS`, without expanding anything.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from trainctl.kernel.errors import ConfigError

MAX_SOURCE_BYTES = 256 << 10  # 256 KiB: pure-Python YAML takes ~2 s for that much
MAX_DEPTH = 32  # a TRL config nests two levels (lr_scheduler_kwargs); nanoGPT's, none
MAX_ITEMS = 1_000_000  # values and string characters as a TOML dump would repeat them: 4x what a file under the cap holds


def read_source(path: Path, what: str) -> str:
    """The text of the regular file ``path`` (a FIFO would block: refused without blocking), at
    most :data:`MAX_SOURCE_BYTES` of it (no byte past the cap is read), UTF-8; else a one-line
    ConfigError. ``what`` names the kind of file in messages ("trl config")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}); give the {what} file to convert") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path} is not a regular file; give the {what} file to convert")
        try:
            data = f.read(MAX_SOURCE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read {path} ({exc.strerror}); give the {what} file to convert") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_SOURCE_BYTES >> 10} KiB, the most a {what} may be "
                          "(they are a few KB); is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); is it a {what}?") from None


def check_values(values: Any, path: Path, what: str) -> None:
    """A one-line ConfigError unless ``values`` nests at most :data:`MAX_DEPTH` deep and holds at
    most :data:`MAX_ITEMS` values and string characters, a shared value counted each time it
    appears. Iterative and stopped at the first excess: a cycle or an alias bomb costs
    :data:`MAX_ITEMS` steps at most."""
    stack: list[tuple[Any, int]] = [(values, 0)]
    items = 0
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{path}: values nested more than {MAX_DEPTH} deep (or a value that contains itself); "
                              f"a {what} holds plain settings: fix the file")
        items += 1 + (len(value) if isinstance(value, (str, bytes)) else 0)
        if items > MAX_ITEMS:
            raise ConfigError(f"{path}: the values stand for more than {MAX_ITEMS} items (YAML aliases repeat what "
                              f"they name); a {what} holds plain settings: fix the file")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value)
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in value)
