"""Remote evaluation.

Worker side (``trainctl eval-worker``): ``jobs`` (the persisted, bounded, idempotent job queue),
``roots`` (which files may be read), ``policy`` (the limits, and the check of a checkpoint's
config), ``app`` (the HTTP API), ``connections`` (header deadlines and the connection cap),
``worker`` (the thread that hands each job to a child process) and ``child`` (that process).
Run side (the ``remote_eval`` plugin): ``outbox`` (durable submissions in the run directory) and
``client`` (the worker's API over HTTP, never following redirects). The evaluation itself is
:mod:`trainctl.evaluation`; docs/security.md says what the worker defends against.

Nothing here imports torch at import time.
"""
