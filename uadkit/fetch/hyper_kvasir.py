"""Hyper-Kvasir (Borgli et al., Scientific Data 2020) into $UADKIT_DATA/hyper-kvasir/.

Two archives from the official site (https://datasets.simula.no/hyper-kvasir/):
the labelled images (about 3.9 GB; the normal classes cecum, ileum and bbps-2-3 are in it)
and the 1,000 segmented polyp images with their masks (about 46 MB).
Licence: CC BY 4.0. The publisher gives no checksum: the command prints the sha256 it got.
    python -m uadkit.fetch hyper_kvasir [--root DIR] [--force]
"""
from __future__ import annotations

from ._core import fetch, parser

BASE = "https://datasets.simula.no/downloads/hyper-kvasir/"
SOURCES = {
    "labeled": (BASE + "hyper-kvasir-labeled-images.zip", None),
    "segmented": (BASE + "hyper-kvasir-segmented-images.zip", None),
}


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    for part, (url, checksum) in SOURCES.items():
        fetch(url, checksum, args.root / "hyper-kvasir" / part, force=args.force)
    print(f"Hyper-Kvasir ready in {args.root / 'hyper-kvasir'}")
