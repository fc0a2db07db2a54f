"""MVTec AD (Bergmann et al., CVPR 2019) into $UADKIT_DATA/mvtec/<category>/.

Licence: CC BY-NC-SA 4.0 (non-commercial). About 5 GB.
    python -m uadkit.fetch mvtec [--root DIR] [--force]
"""
from __future__ import annotations

from ._core import fetch, parser

URL = ("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
       "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz")
CHECKSUM = "sha256:cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    target = fetch(URL, CHECKSUM, args.root / "mvtec", force=args.force)
    print(f"MVTec AD ready in {target}")
