"""CUB-200-2011 (Wah, Branson, Welinder, Perona & Belongie, 2011), the published archive unpacked to
$UADKIT_DATA/cub200/CUB_200_2011/ (images.txt, image_class_labels.txt, train_test_split.txt, images/).

    python -m uadkit.fetch cub [--root DIR] [--force]
"""
from __future__ import annotations

from ._core import fetch, parser

URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CHECKSUM = "md5:97eceeb196236b17998738112f37df78"  # the md5 torchvision-style loaders check


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    print(f"cub200 ready in {fetch(URL, CHECKSUM, args.root / 'cub200', force=args.force)}")
