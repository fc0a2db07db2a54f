"""VisA (Zou et al., ECCV 2022) into $UADKIT_DATA/visa/, with the official split file split_csv/1cls.csv.

Licence: CC BY 4.0. About 2 GB.
    python -m uadkit.fetch visa [--root DIR] [--force]
"""
from __future__ import annotations

from ._core import download, fetch, parser

URL = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
CHECKSUM = "md5:ef908989b6dc701fc218f643c127a4de"
SPLIT_URL = "https://raw.githubusercontent.com/amazon-science/spot-diff/main/split_csv/1cls.csv"


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    target = fetch(URL, CHECKSUM, args.root / "visa", force=args.force)
    split = target / "split_csv" / "1cls.csv"
    if not split.is_file():  # the archive's own copy is used when present
        download(SPLIT_URL, split, checksum=None)
    print(f"VisA ready in {target}")
