"""``python tests/small_files_rank.py ARGS``: ``trainctl ARGS`` in a process that cannot write a
file larger than 1 KiB when its ``RANK`` equals ``SMALL_FILES_RANK`` (as if that rank's disk were
full), so one rank of a launcher's group fails its part of a checkpoint for real."""

from __future__ import annotations

import os
import resource
import runpy
import signal
import sys

if os.environ.get("RANK") == os.environ.get("SMALL_FILES_RANK"):
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write (EFBIG), not a killed process

sys.argv[0] = "trainctl"
runpy.run_module("trainctl", run_name="__main__", alter_sys=True)
