"""Built-in plugins, registered through the same hook as third-party ones.

Each module holds one plugin: its frozen ``Config`` (mirroring ``[plugin.NAME]``), the plugin
class and its ``SPEC``. Modules here must not import torch at import time.
"""

from trainctl.hooks import hookimpl


@hookimpl
def trainctl_register_plugins(register):
    from trainctl.plugins import (
        checkpoint, console, controller, jsonl, loss_guard, lr, notify, remote_eval, status, z_loss,
    )

    for module in (lr, controller, checkpoint, status, console, jsonl, z_loss, loss_guard, remote_eval, notify):
        register(module.SPEC)
