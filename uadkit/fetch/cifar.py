"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) in torchvision's on-disk format:
$UADKIT_DATA/cifar10/cifar-10-batches-py/ and $UADKIT_DATA/cifar100/cifar-100-python/.

    python -m uadkit.fetch cifar [--root DIR] [--force] [--only cifar10|cifar100]
"""
from __future__ import annotations

from ._core import fetch, parser

SOURCES = {  # the publisher gives md5 sums (the same ones torchvision checks)
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "md5:eb9058c3a382ffc7106e4002c42a8d85"),
}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--only", choices=sorted(SOURCES))
    args = p.parse_args(argv)
    for name, (url, checksum) in SOURCES.items():
        if args.only in (None, name):
            print(f"{name} ready in {fetch(url, checksum, args.root / name, force=args.force)}")
