"""``python -m trainctl``; also ``torchrun -m trainctl`` and, from the repository root,
``accelerate launch trainctl run ...`` (Python runs this file from the package directory)."""

import sys
from pathlib import Path

if not __package__:  # run as a directory: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainctl.cli import main  # noqa: E402

main()
