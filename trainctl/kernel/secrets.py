"""Secrets in configs: a plugin marks a key secret with :func:`secret` (a token, a webhook URL),
and the copy of the resolved config saved into every checkpoint holds it empty. The plugins that
have such keys read an environment variable when the key is empty, so the saved config still
resumes and evaluates; the secret itself never lands on disk, and the file is the user's alone
(mode 0600) for whatever else a config may hold.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

SECRET = "trainctl.secret"


def secret(default: str = "") -> Any:
    """A dataclass field whose value is a secret: saved empty in checkpoints."""
    return dataclasses.field(default=default, metadata={SECRET: True})


def secret_keys(config: Any) -> list[str]:
    if not dataclasses.is_dataclass(config):
        return []
    return [f.name for f in dataclasses.fields(config) if f.metadata.get(SECRET)]


def redacted(tables: dict[str, Any], plugin_configs: dict[str, Any]) -> dict[str, Any]:
    """``tables`` (a resolved config's ``to_dict()``) with every secret plugin key emptied."""
    plugins = {name: dict(table) for name, table in tables.get("plugin", {}).items()}
    for name, config in plugin_configs.items():
        for key in secret_keys(config):
            if plugins.get(name, {}).get(key):
                plugins[name][key] = ""
    return {**tables, "plugin": plugins}


def write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by the user alone, never through a link planted at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, 0o600)  # the file may have existed with a wider mode
        f.write(text)


def save_config(path: Path, config: Any) -> None:
    """The resolved config ``config`` (a RunConfig) as TOML at ``path``: secrets out, mode 0600."""
    from trainctl.kernel.config import dump_toml

    write_private(path, dump_toml(redacted(config.to_dict(), config.plugin)))
