"""Remote evaluation.

Worker side (``trainctl eval-worker``): ``jobs`` (the persisted, idempotent job queue), ``roots``
(which checkpoints may be read), ``app`` (the HTTP API), ``worker`` (the evaluation thread).
Run side (the ``remote_eval`` plugin): ``outbox`` (durable submissions in the run directory) and
``client`` (the worker's API over HTTP). The evaluation itself is :mod:`trainctl.evaluation`.

Nothing here imports torch at import time.
"""
