"""Built-in plugins, registered through the same hook as third-party ones.

Each module holds one plugin: its frozen ``Config`` (mirroring ``[plugin.NAME]``), the plugin
class and its ``SPEC``. Modules here must not import torch at import time.
"""

from trainctl.hooks import hookimpl


@hookimpl
def trainctl_register_plugins(register):
    from trainctl.plugins import (
        checkpoint, console, controller, csv, jsonl, layer_stats, loss_guard, lr, notify, prometheus,
        remote_eval, samples, status, tensorboard, topk_accuracy, wandb, z_loss,
    )

    for module in (lr, controller, checkpoint, status, console, jsonl, z_loss, loss_guard, remote_eval,
                   notify, prometheus, tensorboard, wandb, csv, samples, layer_stats, topk_accuracy):
        register(module.SPEC)
