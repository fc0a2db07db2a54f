#!/usr/bin/env python3
"""BMAD: the code lives in ``uadkit.fetch.bmad``, and ``python -m uadkit.fetch bmad``
does the same (same arguments; ``--help`` shows them)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's uadkit, installed or not

from uadkit.fetch._core import install_excepthook  # noqa: E402
from uadkit.fetch.bmad import main  # noqa: E402

if __name__ == "__main__":
    install_excepthook()
    main()
