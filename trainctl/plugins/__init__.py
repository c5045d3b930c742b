"""Built-in plugins, registered through the same hook as third-party ones.

Each module holds one plugin: its frozen ``Config`` (mirroring ``[plugin.NAME]``), the plugin
class and its ``SPEC``. Modules here must not import torch at import time.
"""

from trainctl.hooks import hookimpl


@hookimpl
def trainctl_register_plugins(register):
    from trainctl.plugins import checkpoint, console, jsonl, lr, notify, remote_eval, z_loss
    from trainctl.plugins import csv, layer_stats, prometheus, samples, tensorboard, wandb

    for module in (lr, checkpoint, console, jsonl, z_loss, remote_eval, notify,
                   prometheus, tensorboard, wandb, csv, samples, layer_stats):
        register(module.SPEC)
