"""Download, verify and unpack the paper profile's datasets and the backbone weights, from the command line:

    python -m uadkit.fetch <name> [--root DIR] [--force]     (python -m uadkit.fetch --help lists the names)

One module per name, each with ``main(argv=None)``; the download, verify and unpack code they share is
:mod:`uadkit.fetch._core`. Importing them changes nothing global: only the command line (``__main__``, the
wrappers in a checkout's ``data_scripts/``) makes a FetchError print ``error: <message>`` instead of a traceback.
"""
from __future__ import annotations

from ._core import FetchError

__all__ = ["COMMANDS", "FetchError"]

# name -> what it does, one line each (``python -m uadkit.fetch --help``)
COMMANDS: dict[str, str] = {
    "mvtec": "MVTec AD into $UADKIT_DATA/mvtec/ (about 5 GB)",
    "visa": "VisA into $UADKIT_DATA/visa/, with the split file split_csv/1cls.csv (about 2 GB)",
    "cifar": "CIFAR-10 and CIFAR-100 into $UADKIT_DATA/cifar10/, cifar100/ (--only one of them)",
    "cub": "CUB-200-2011 into $UADKIT_DATA/cub200/",
    "covidx": "checks $UADKIT_DATA/covidx/ (a manual Kaggle download; says what to fetch)",
    "hyper_kvasir": "Hyper-Kvasir (labelled and segmented images) into $UADKIT_DATA/hyper-kvasir/",
    "bmad": "checks $UADKIT_DATA/bmad/ (a manual download); --liver-roi writes QFAE's LiverCT preprocessing",
    "weights": "backbone weights into $UADKIT_WEIGHTS (default ~/.cache/uadkit/weights); --list shows them",
}
