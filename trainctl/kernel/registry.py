"""What is available: plugins and backends, built-in and from the ``trainctl.plugins``
entry-point group. Being available enables nothing; a config's ``plugins`` list does.

Built-ins are registered through the same hooks as third-party modules. Building the registry
imports only light modules (no torch), so ``trainctl plugins`` and ``--help`` stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import sys
from types import ModuleType
from typing import TYPE_CHECKING

import pluggy

from trainctl.hooks import spec
from trainctl.hooks.plugin import BackendSpec, PluginSpec
from trainctl.kernel.errors import ConfigError

if TYPE_CHECKING:
    import click

ENTRY_POINT_GROUP = "trainctl.plugins"
BUILTIN_MODULES = ("trainctl.plugins", "trainctl.backends")


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(spec.PROJECT)
    pm.add_hookspecs(spec)
    return pm


def check_hooks(pm: pluggy.PluginManager, name: str) -> None:
    """pluggy's ``check_pending``: every implementation of a registered plugin names a hook of
    the spec (or is marked ``optionalhook``). A typo is a ConfigError naming the plugin, the
    hook and the closest real one, instead of an implementation that is never called."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        unknown = sorted(
            c.name for c in pm.get_hookcallers(exc.plugin) or ()
            if not c.has_spec() and any(i.plugin is exc.plugin and not i.optionalhook for i in c.get_hookimpls())
        )
        hook = unknown[0] if unknown else "?"
        # compared without the common prefix, which would make every trainctl_* name look close
        known = {n.removeprefix(f"{spec.PROJECT}_"): n for n, c in vars(pm.hook).items() if c.has_spec()}
        close = difflib.get_close_matches(hook.removeprefix(f"{spec.PROJECT}_"), sorted(known), n=1)
        hint = f"did you mean {known[close[0]]}?" if close else "the hooks are listed in trainctl.hooks.spec"
        raise ConfigError(f"{name} implements unknown hook {hook}; {hint}") from None


class Registry:
    """Every plugin and backend that could be enabled, by name."""

    def __init__(self) -> None:
        self._pm = new_plugin_manager()
        self.plugins: dict[str, PluginSpec] = {}
        self.backends: dict[str, BackendSpec] = {}
        self.broken: dict[str, str] = {}  # entry point -> why it could not load

    @classmethod
    def discover(cls, *, entry_points: bool = True) -> Registry:
        registry = cls()
        for name in BUILTIN_MODULES:
            registry.add_module(importlib.import_module(name), source="builtin")
        if entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                source = ep.dist.name if ep.dist else ep.value
                try:
                    registry.add_module(ep.load(), source=source)
                except ConfigError as exc:
                    registry.broken[ep.name] = f"{source}: {exc}"
                except Exception as exc:  # a broken third-party package must not break trainctl
                    registry.broken[ep.name] = f"{source}: {type(exc).__name__}: {exc}"
        return registry

    def add_module(self, module: ModuleType | object, *, source: str) -> None:
        """Register a module (or object) of ``trainctl_register_*`` hooks and collect its specs."""
        self._pm.register(module)
        try:
            check_hooks(self._pm, f"module {getattr(module, '__name__', type(module).__name__)}")
        except ConfigError:
            self._pm.unregister(module)
            raise
        caller = self._pm.subset_hook_caller  # call only this module's hooks
        others = [p for p in self._pm.get_plugins() if p is not module]

        def add(table: dict, item: PluginSpec | BackendSpec, kind: str) -> None:
            if item.name in table:
                raise ConfigError(
                    f"{kind} '{item.name}' is registered twice ({table[item.name].source} and {source}); "
                    "uninstall one of the packages"
                )
            table[item.name] = dataclasses.replace(item, source=source)

        caller("trainctl_register_plugins", others)(register=lambda s: add(self.plugins, s, "plugin"))
        caller("trainctl_register_backends", others)(register=lambda s: add(self.backends, s, "backend"))

    def plugin(self, name: str) -> PluginSpec:
        if name not in self.plugins:
            raise ConfigError(f"unknown plugin '{name}'{self._why(name)}; available: {', '.join(sorted(self.plugins))}")
        return self.plugins[name]

    def backend(self, name: str) -> BackendSpec:
        if name not in self.backends:
            raise ConfigError(f"unknown backend '{name}'{self._why(name)}; available: {', '.join(sorted(self.backends))}")
        return self.backends[name]

    def backend_sections(self) -> set[str]:
        return {section for b in self.backends.values() for section in b.sections}

    def register_commands(self, cli: click.Group) -> None:
        self._pm.hook.trainctl_register_commands(cli=cli)

    def _why(self, name: str) -> str:
        return f" (its package failed to load: {self.broken[name]})" if name in self.broken else ""


def load_factory(path: str) -> object:
    """Import ``"module:attr"``."""
    module_name, _, attr = path.partition(":")
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    return getattr(module, attr)
