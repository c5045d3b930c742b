"""Loading a run's config: TOML file → ``--set`` overrides → validated, fully resolved tables.

Layout of a config file (every table optional)::

    seed = 1337
    backend = "gpt"
    plugins = ["lr", "controller", "checkpoint", "status", "console", "jsonl"]   # call order; the default
    [train] ...  [optim] ...                              # the kernel's (trainctl.kernel.schema)
    [model] ...  [data] ...                               # the backend's own dataclasses
    [plugin.lr] ...                                       # each plugin's own dataclass

Nothing in a config is ever executed: TOML values only.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl.kernel.errors import ConfigError
from trainctl.kernel.registry import Registry
from trainctl.kernel.schema import (
    OptimConfig,
    TrainConfig,
    as_table,
    build,
    did_you_mean,
    locked_keys,
)

# decisions first, loggers last (list order is call order)
DEFAULT_PLUGINS = ("lr", "controller", "checkpoint", "status", "console", "jsonl")
TOP_LEVEL = ("seed", "backend", "plugins", "train", "optim", "model", "data", "plugin")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """A validated config: every table built, every default filled in."""

    seed: int
    backend: str
    plugins: tuple[str, ...]
    train: TrainConfig
    optim: OptimConfig
    model: Any
    data: Any
    sections: dict[str, Any]  # backend-owned extra tables, e.g. [hf]
    plugin: dict[str, Any]  # enabled plugin name -> its Config

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as TOML-ready tables (what ``config show`` prints)."""
        out: dict[str, Any] = {"seed": self.seed, "backend": self.backend, "plugins": list(self.plugins)}
        for name in ("train", "optim", "model", "data"):
            out[name] = as_table(getattr(self, name))
        for name, table in self.sections.items():
            out[name] = as_table(table)
        out["plugin"] = {name: as_table(cfg) for name, cfg in self.plugin.items()}
        return out

    def locked(self) -> dict[str, Any]:
        """``{"model.n_layer": 4, ...}``: the values that may not change across a resume."""
        return {
            f"{section}.{key}": getattr(getattr(self, section), key)
            for section in ("model", "data")
            for key in locked_keys(type(getattr(self, section)))
        }


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is one ConfigError line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc.__class__.__name__}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b.c=VALUE`` overrides; VALUE is parsed as TOML, else taken as a string."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # bare words: --set train.device=cpu
        *parents, leaf = key.split(".")
        table = raw
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a table")
        table[leaf] = value
    return raw


def resolve(raw: dict[str, Any], registry: Registry, *, source: str = "") -> RunConfig:
    """Validate every table of ``raw`` and fill in defaults."""
    for key in raw:
        if key not in TOP_LEVEL and key not in registry.backend_sections():
            raise ConfigError(f"unknown top-level key '{key}'{did_you_mean(key, TOP_LEVEL)}")
    seed = raw.get("seed", 1337)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    backend_name = raw.get("backend", "gpt")
    backend = registry.backend(backend_name)
    for key in raw:
        if key not in TOP_LEVEL and key not in backend.sections:
            raise ConfigError(f"[{key}] belongs to another backend, not to '{backend_name}'")
    plugins = raw.get("plugins", list(DEFAULT_PLUGINS))
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError('plugins must be a list of names, e.g. plugins = ["lr", "console"]')
    if len(set(plugins)) != len(plugins):
        raise ConfigError("plugins lists a plugin twice; each name may appear once")
    tables = raw.get("plugin", {})
    if not isinstance(tables, dict):
        raise ConfigError("[plugin] must hold one table per plugin, e.g. [plugin.lr]")
    for name in tables:
        if name not in plugins:
            hint = "add it to plugins = [...]" if name in registry.plugins else f"no such plugin{did_you_mean(name, registry.plugins)}"
            raise ConfigError(f"[plugin.{name}] configures a plugin that is not enabled: {hint}")
    plugin_configs = {
        name: build(registry.plugin(name).config, tables.get(name, {}), f"plugin.{name}")
        for name in plugins
    }
    return RunConfig(
        seed=seed,
        backend=backend_name,
        plugins=tuple(plugins),
        train=build(TrainConfig, raw.get("train", {}), "train"),
        optim=build(OptimConfig, raw.get("optim", {}), "optim"),
        model=build(backend.model_config, raw.get("model", {}), "model"),
        data=build(backend.data_config, raw.get("data", {}), "data"),
        sections={name: build(cls, raw.get(name, {}), name) for name, cls in backend.sections.items()},
        plugin=plugin_configs,
    )


def load(
    path: str | Path | None,
    registry: Registry,
    *,
    overrides: list[str] = (),  # type: ignore[assignment]
    backend: str | None = None,
    out_dir: str | None = None,
) -> RunConfig:
    """The whole path from a file (or none: all defaults) to a validated RunConfig."""
    raw = read_toml(path) if path else {}
    apply_overrides(raw, list(overrides))
    if backend:
        raw["backend"] = backend
    if out_dir:
        raw.setdefault("train", {})["out_dir"] = out_dir
    if path and not raw.get("train", {}).get("run_name"):
        raw.setdefault("train", {})["run_name"] = Path(path).stem
    return resolve(raw, registry, source=str(path or ""))


def dump_toml(tables: dict[str, Any]) -> str:
    """Write resolved tables as TOML (scalars and lists of scalars, nested tables)."""
    lines: list[str] = []
    scalars = {k: v for k, v in tables.items() if not isinstance(v, dict) and v is not None}
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")

    def table(prefix: str, body: dict[str, Any]) -> None:
        flat = {k: v for k, v in body.items() if not isinstance(v, dict) and v is not None}
        nested = {k: v for k, v in body.items() if isinstance(v, dict)}
        if flat or not nested:
            lines.extend(["", f"[{prefix}]"])
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in flat.items())
        for k, v in nested.items():
            table(f"{prefix}.{k}", v)

    for key, value in tables.items():
        if isinstance(value, dict):
            table(key, value)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are TOML's (\n, \t, \uXXXX): a prompt of "\n" must stay one line
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {type(value).__name__} as TOML")
