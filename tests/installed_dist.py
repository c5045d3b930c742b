"""A distribution installed the way pip leaves it, for entry-point tests: its modules and its
dist-info (METADATA, entry_points.txt in trainctl's group) in a folder put on the path."""

from __future__ import annotations

import textwrap
from pathlib import Path

from trainctl.kernel.registry import ENTRY_POINT_GROUP


def install(site: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """``name`` 0.1 into ``site``: ``entry_points`` (entry name -> module) and ``modules``
    (module name -> source, dedented)."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{entry} = {module}\n" for entry, module in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    return site
