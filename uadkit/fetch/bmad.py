"""BMAD medical anomaly-detection sets (Bao et al., 2024) into $UADKIT_DATA/bmad/.

BMAD is shared through a Google Drive folder and under its sources' licences (BraTS2021,
BTCV + LiTS, RESC, RSNA; CC BY-NC-SA overall), so this command cannot download it. Fetch it
by hand from github.com/DorisBao/BMAD and unpack the sets so that

    $UADKIT_DATA/bmad/Brain/  Liver/  RESC/  Chest/

each hold train/good/img/ and test/{good,Ungood}/img/ (with Ungood/label/ masks for Brain,
Liver and RESC). Then run this command to check the layout:

    python -m uadkit.fetch bmad [--root DIR]
    python -m uadkit.fetch bmad --liver-roi     # also write Liver_roi/ (QFAE Sec. 7.1 preprocessing)

``--liver-roi`` crops every Liver image to its non-zero region, centres it on a black
224x224 canvas and applies the bilateral filter (uadkit.models.qfae.liver_ct_roi); masks follow
the same geometry. The result loads as ``bmad/liverct-roi``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ._core import MARKER, parser

MANUAL = "https://github.com/DorisBao/BMAD"
SETS = {"Brain": True, "Liver": True, "RESC": True, "Chest": False}  # folder -> has pixel masks


def check(root: Path, folder: str) -> str | None:
    """None when ``bmad/<folder>`` has the layout the loader reads, else what is missing."""
    base = root / "bmad" / folder
    need = ["train/good/img", "test/good/img", "test/Ungood/img"] + (["test/Ungood/label"] if SETS[folder] else [])
    missing = [p for p in need if not (base / p).is_dir()]
    return f"{base}: missing {', '.join(missing)}" if missing else None


def liver_roi(root: Path, force: bool = False) -> Path:
    """Write ``bmad/Liver_roi`` from ``bmad/Liver`` with QFAE's LiverCT preprocessing."""
    import numpy as np
    from PIL import Image

    from ..models.qfae import liver_ct_roi

    src, dst = root / "bmad" / "Liver", root / "bmad" / "Liver_roi"
    if (dst / MARKER).is_file() and not force:
        print(f"{dst} is complete (use --force to redo it)")
        return dst
    images = sorted(p for p in src.glob("*/*/img/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not images:
        sys.exit(f"no Liver images under {src}/<split>/<good|Ungood>/img/")
    for n, img in enumerate(images, 1):
        mask_path = img.parent.parent / "label" / img.name
        mask = np.asarray(Image.open(mask_path).convert("L")) if mask_path.is_file() else None
        out = liver_ct_roi(np.asarray(Image.open(img).convert("L")), mask)
        rel = img.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out[0] if mask is not None else out).save((dst / rel).with_suffix(".png"))
        if mask is not None:
            label = dst / rel.parent.parent / "label" / (img.stem + ".png")
            label.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(out[1]).save(label)
        print(f"\r{n}/{len(images)} Liver images", end="", flush=True)
    print()
    (dst / MARKER).write_text("ok\n")
    return dst


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--liver-roi", action="store_true", help="also write bmad/Liver_roi (QFAE Sec. 7.1)")
    args = p.parse_args(argv)
    problems = {f: check(args.root, f) for f in SETS}
    for folder, problem in problems.items():
        print(f"{folder:6s} {'ready' if problem is None else 'NOT READY: ' + problem}")
    if args.liver_roi:
        if problems["Liver"]:
            sys.exit("--liver-roi needs bmad/Liver first")
        print(f"wrote {liver_roi(args.root, args.force)}")
    if all(problems.values()):
        sys.exit(f"BMAD needs a manual download: {MANUAL}\nUnpack Brain/, Liver/, RESC/, Chest/ into "
                 f"{args.root / 'bmad'} and re-run this command.")
