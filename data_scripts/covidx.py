#!/usr/bin/env python3
"""Covid-X: the code lives in ``uadkit.fetch.covidx``, and ``python -m uadkit.fetch covidx``
does the same (same arguments; ``--help`` shows them)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's uadkit, installed or not

from uadkit.fetch._core import install_excepthook  # noqa: E402
from uadkit.fetch.covidx import main  # noqa: E402

if __name__ == "__main__":
    install_excepthook()
    main()
