"""Loading a run's config: TOML file → ``--set`` overrides → validated, fully resolved tables.

Layout of a config file (every table optional)::

    seed = 1337
    backend = "gpt"
    plugins = ["defaults", "prometheus"]   # call order; "defaults" expands in place (DEFAULT_PLUGINS)
    [train] ...  [optim] ...                              # the kernel's (trainctl.kernel.schema)
    [model] ...  [data] ...                               # the backend's own dataclasses
    [plugin.lr] ...                                       # each plugin's own dataclass

Nothing in a config is ever executed: TOML values only. Every value reaches its typed field
through :func:`trainctl.kernel.schema.checked` (type, finiteness, text, bounds).

``"defaults"`` in the plugins list stands for the default list, so adding a plugin never drops
the ones that keep a run safe (``controller``: SIGTERM saves; ``status``). A list without them
is allowed, with a warning in :attr:`RunConfig.warnings`; so is a ``[plugin.X]`` table for a
known plugin that the list leaves out (it is ignored).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl.kernel import accelerate_env, foreign_names
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.registry import Registry
from trainctl.kernel.schema import (
    OptimConfig,
    TrainConfig,
    as_table,
    as_table_value,
    build,
    checked,
    did_you_mean,
    locked_keys,
    require_table,
)

# decisions first, loggers last (list order is call order)
DEFAULT_PLUGINS = ("lr", "controller", "checkpoint", "status", "console", "jsonl")
DEFAULTS = "defaults"  # in a plugins list: DEFAULT_PLUGINS, in place
# without these a run still trains, but a preemption loses the steps since the last checkpoint
SAFETY = {
    "controller": "SIGTERM and Ctrl-C end the run without a checkpoint and trainctl ctl cannot reach it",
    "status": "trainctl status has nothing to show",
}
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
    warnings: tuple[str, ...] = ()  # one line each, for stderr at start-up; not part of the config

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
            f"{section}.{key}": as_table_value(getattr(getattr(self, section), key))  # plain: kernel.json holds them
            for section in ("model", "data")
            for key in locked_keys(type(getattr(self, section)))
        }

    def locked_defaults(self) -> dict[str, Any]:
        """The defaults of the locked keys: what a checkpoint written before a key existed trained with."""
        return {
            f"{section}.{f.name}": as_table_value(f.default)
            for section in ("model", "data")
            for f in dataclasses.fields(type(getattr(self, section))) if f.metadata.get("locked")
        }


YAML_KEY = re.compile(r"(?:\s*#[^\n]*\n)*\s*[A-Za-z_][\w.-]*:(?:\s|$)")  # a first setting `name: value`


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
        if path.suffix.lower() in (".yaml", ".yml") or YAML_KEY.match(text):  # a `trl sft --config` file, most likely
            raise ConfigError(f"{path} is YAML, and trainctl configs are TOML: convert a TRL config with "
                              f"`trainctl config import-trl {path} -o config.toml`") from None
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None


def put_key(tables: dict[str, Any], table: str, key: str, value: Any) -> None:
    """``tables[table...][key] = value``, with ``table`` dotted (``plugin.lr``), making tables on the way."""
    for part in table.split("."):
        tables = tables.setdefault(part, {})
    tables[key] = value


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
            raise ConfigError(f"unknown top-level key '{key}'{foreign_names.hint(key, key) or did_you_mean(key, TOP_LEVEL)}")
    seed = checked(raw.get("seed", 1337), int, "seed", bounds={"ge": 0, "lt": 2**32})  # numpy's seed range
    backend_name = checked(raw.get("backend", "gpt"), str, "backend")
    backend = registry.backend(backend_name)
    for key in raw:
        if key not in TOP_LEVEL and key not in backend.sections:
            owner = next(name for name, spec in registry.backends.items() if key in spec.sections)
            raise ConfigError(f"[{key}] belongs to the '{owner}' backend, not to '{backend_name}': use --backend {owner} or backend = \"{owner}\"")
    plugins = expand_plugins(raw.get("plugins", [DEFAULTS]))
    tables = require_table(raw.get("plugin", {}), "plugin")
    warnings = [w for w in [_safety_warning(plugins)] if w]
    for name in tables:
        if name not in registry.plugins:
            raise ConfigError(f"[plugin.{name}] configures no known plugin{did_you_mean(name, registry.plugins)}; see trainctl plugins")
        if name not in plugins:
            warnings.append(f"[plugin.{name}] is ignored: '{name}' is not in plugins = [...]")
    plugin_configs = {
        name: build(registry.plugin(name).config, tables.get(name, {}), f"plugin.{name}")
        for name in plugins
    }
    for section in ("model", "data"):
        _check_backend_keys(raw.get(section, {}), section, backend_name, registry)
    return RunConfig(
        seed=seed,
        backend=backend_name,
        plugins=plugins,
        train=build(TrainConfig, raw.get("train", {}), "train"),
        optim=build(OptimConfig, raw.get("optim", {}), "optim"),
        model=build(backend.model_config, raw.get("model", {}), "model"),
        data=build(backend.data_config, raw.get("data", {}), "data"),
        sections={name: build(cls, raw.get(name, {}), name) for name, cls in backend.sections.items()},
        plugin=plugin_configs,
        warnings=tuple(warnings),
    )


def expand_plugins(value: Any) -> tuple[str, ...]:
    """The plugins list with ``"defaults"`` replaced, in place, by :data:`DEFAULT_PLUGINS`."""
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError('plugins must be a list of names, e.g. plugins = ["defaults", "prometheus"]')
    names = [n for p in value for n in (DEFAULT_PLUGINS if p == DEFAULTS else (p,))]
    for name in names:
        checked(name, str, "plugins")
        if names.count(name) > 1:
            inside = f' ("{DEFAULTS}" holds {", ".join(DEFAULT_PLUGINS)})' if DEFAULTS in value and name in DEFAULT_PLUGINS else ""
            raise ConfigError(f"plugins lists '{name}' twice{inside}; each name may appear once")
    return tuple(names)


def _safety_warning(plugins: tuple[str, ...]) -> str:
    missing = [name for name in SAFETY if name not in plugins]
    if not missing:
        return ""
    what = "; ".join(f"without {name}, {SAFETY[name]}" for name in missing)
    return f"plugins leaves out {' and '.join(missing)}: {what}; add them, or start the list with \"{DEFAULTS}\""


def _check_backend_keys(table: Any, section: str, backend: str, registry: Registry) -> None:
    """A key that this backend's table lacks but another backend's has: name that backend
    (``build`` answers every other unknown key, with its did-you-mean)."""

    def has(name: str, key: str) -> bool:
        return any(f.name == key for f in dataclasses.fields(getattr(registry.backends[name], f"{section}_config")))

    for key in table if isinstance(table, dict) else ():
        owner = next((name for name in sorted(registry.backends) if name != backend and has(name, key)), None)
        if owner and not has(backend, key):
            raise ConfigError(
                f"unknown key '{section}.{key}' for the '{backend}' backend: it is a key of the '{owner}' "
                f"backend; use --backend {owner} or backend = \"{owner}\""
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
        _table(raw, "train")["out_dir"] = out_dir
    if path and not _table(raw, "train").get("run_name"):
        _table(raw, "train")["run_name"] = Path(path).stem
    launcher = accelerate_env.apply(raw, os.environ)  # accelerate launch --use_fsdp ...: its settings, or one line
    resolved = resolve(raw, registry, source=str(path or ""))
    return dataclasses.replace(resolved, warnings=resolved.warnings + tuple(launcher)) if launcher else resolved


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """``raw[name]``, created empty if absent; a section set to a scalar is a ConfigError."""
    return require_table(raw.setdefault(name, {}), name)


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


ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # a basic string: a newline in a chat template must stay one
        return '"' + "".join(ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: an array of tables ([[data.sources]]) as a list of them
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise ConfigError(f"cannot write {type(value).__name__} as TOML")
