"""Covid-X chest X-rays (COVIDx CXR, Wang et al. 2020) into $UADKIT_DATA/covidx/.

COVIDx is distributed through Kaggle, which needs an account, so this command cannot download
it. Download the COVIDx CXR release by hand (kaggle.com/datasets/andyczhao/covidx-cxr2, or
build it with github.com/lindawangg/COVID-Net), then unpack it so that

    $UADKIT_DATA/covidx/train/  $UADKIT_DATA/covidx/test/  train.txt  test.txt

exist (the label files: '<patient id> <file> <positive|negative> <source>' per line), and run
this command to check the layout. Licence: see the COVIDx sources (mixed; research use).
    python -m uadkit.fetch covidx [--root DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

from ._core import parser

MANUAL = "https://www.kaggle.com/datasets/andyczhao/covidx-cxr2"


def check(root: Path) -> str | None:
    """None when the layout is complete, else what is missing."""
    base = root / "covidx"
    missing = [p for p in ("train", "test", "train.txt", "test.txt") if not (base / p).exists()]
    return f"missing in {base}: {', '.join(missing)}" if missing else None


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    problem = check(args.root)
    if problem:
        sys.exit(f"Covid-X needs a manual download (Kaggle account): {MANUAL}\n{problem}\n"
                 "Unpack train/, test/, train.txt and test.txt there, then re-run this command.")
    print(f"Covid-X ready in {args.root / 'covidx'}")
