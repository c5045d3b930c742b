"""Errors the CLI turns into one line and an exit code, never a traceback."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad usage, config or input data: one line naming the problem and the fix. Exit code 2."""

    exit_code = 2


class PluginError(Exception):
    """A critical plugin failed; the run ends as failed and names the plugin."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        super().__init__(f"plugin {plugin!r} failed in {hook}: {type(error).__name__}: {error}")
        self.plugin = plugin
