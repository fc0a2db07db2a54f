"""Real datasets on disk in their published layouts: MVTec AD, VisA, any MVTec-style folder.

MVTec AD, ``$UADKIT_DATA/mvtec/<category>/``::

    train/good/*.png   test/good/*.png   test/<defect>/*.png   ground_truth/<defect>/<stem>_mask.png

VisA, ``$UADKIT_DATA/visa/`` with the official split file ``split_csv/1cls.csv``
(columns ``object,split,label,image,mask``; paths relative to ``visa/``).

``folder/<path>``: any tree shaped like MVTec AD (BMAD, Uni-Medical, converted
sets); ``ground_truth/`` is optional, and without it the set has no masks.

What is read from such a tree:

* hidden entries are skipped: every file or folder whose name starts with ``.`` (``.ipynb_checkpoints/``,
  macOS's ``._000.png`` and ``.DS_Store``), and ``__MACOSX/``; images are the files ending in
  ``.png .jpg .jpeg .bmp .tif .tiff`` (any case);
* ``train/`` must hold ``good/`` only (anomaly detection trains on normal images): another folder there
  is an error naming it;
* under ``test/``, ``good/`` is normal and every other folder a defect type;
* the mask of ``test/<defect>/<stem>.<ext>`` is ``ground_truth/<defect>/<stem>_mask.<e>`` or
  ``ground_truth/<defect>/<stem>.<e>``, ``<e>`` any of the image suffixes (PNG first).
"""
from __future__ import annotations

import csv
from pathlib import Path

from .base import DatasetUnavailable, FileDataset, Record, UnknownDataset, data_root, missing_root_error

__all__ = ["MVTEC_CATEGORIES", "VISA_CATEGORIES", "mvtec", "visa", "folder"]

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                   "pcb3", "pcb4", "pipe_fryum")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")  # lossless first


def _hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name == "__MACOSX"


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p) and p.is_file())


def _folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p))


def _mask_for(gt_dir: Path, image: Path) -> str | None:
    for stem in (f"{image.stem}_mask", image.stem):
        for suffix in MASK_SUFFIXES:
            for candidate in (gt_dir / (stem + suffix), gt_dir / (stem + suffix.upper())):
                if candidate.is_file():
                    return str(candidate)
    return None


def _mvtec_records(root: Path, split: str, category: str, *, name: str) -> tuple[list[Record], bool]:
    """Records of an MVTec-style tree; also whether it has a ground_truth folder."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetUnavailable(f"{name}: no '{split}' folder in {root} (expected {split}/good/ and, for test, "
                                 f"{split}/<defect>/)")
    has_gt = (root / "ground_truth").is_dir()
    records = []
    subs = _folders(split_dir)
    if split == "train" and any(sub.name != "good" for sub in subs):
        others = ", ".join(sub.name + "/" for sub in subs if sub.name != "good")
        raise DatasetUnavailable(f"{name}: {split_dir} may hold only good/ (training uses normal images); found "
                                 f"{others}. Move anomalous images under test/<defect>/")
    for sub in subs:
        label = 0 if sub.name == "good" else 1
        for img in _images(sub):
            mask = _mask_for(root / "ground_truth" / sub.name, img) if label else None
            records.append(Record(str(img), label, category, mask))
    if not records:
        raise DatasetUnavailable(f"{name}: no images under {split_dir}")
    return records, has_gt


def mvtec(category: str, split: str, *, root=None, image_size: int | None = 256) -> FileDataset:
    """MVTec AD ``category`` (one of :data:`MVTEC_CATEGORIES`)."""
    if category not in MVTEC_CATEGORIES:
        raise UnknownDataset(f"unknown MVTec AD category {category!r}; valid: {', '.join(MVTEC_CATEGORIES)}")
    base = data_root(root) / "mvtec"
    if not (base / category).is_dir():
        raise missing_root_error(f"mvtec/{category}", base, "mvtec")
    records, _ = _mvtec_records(base / category, split, f"mvtec/{category}", name=f"mvtec/{category}")
    return FileDataset(records, image_size=image_size, name=f"mvtec/{category}", masks_expected=True)


def visa(category: str, split: str, *, root=None, image_size: int | None = 256,
         split_file: str = "split_csv/1cls.csv") -> FileDataset:
    """VisA ``category`` via the official one-class split file."""
    if category not in VISA_CATEGORIES:
        raise UnknownDataset(f"unknown VisA category {category!r}; valid: {', '.join(VISA_CATEGORIES)}")
    base = data_root(root) / "visa"
    csv_path = base / split_file
    if not csv_path.is_file():
        raise missing_root_error(f"visa/{category}", base, "visa")
    records = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["object"] != category or row["split"] != split:
                continue
            label = 0 if row["label"] == "normal" else 1
            mask = str(base / row["mask"]) if label and row.get("mask") else None
            records.append(Record(str(base / row["image"]), label, f"visa/{category}", mask))
    if not records:
        raise DatasetUnavailable(f"visa/{category}: no '{split}' rows in {csv_path}")
    return FileDataset(records, image_size=image_size, name=f"visa/{category}", masks_expected=True)


def folder(path: str, split: str, *, root=None, image_size: int | None = 256) -> FileDataset:
    """Any MVTec-style tree at ``path`` (relative paths: under ``$UADKIT_DATA`` if there, else here)."""
    if not str(path).strip():
        raise UnknownDataset("folder/<path> needs the path of an MVTec-style tree, e.g. 'folder/~/data/my_set'")
    p = Path(path).expanduser()
    if not p.is_absolute() and (data_root(root) / p).is_dir():
        p = data_root(root) / p
    if not p.is_dir():
        raise DatasetUnavailable(f"folder/{path}: {p} does not exist; expected an MVTec-style tree with "
                                 "train/good/, test/good/, test/<defect>/ and optionally ground_truth/<defect>/")
    name = f"folder/{p.name}"
    records, has_gt = _mvtec_records(p, split, name, name=name)
    ds = FileDataset(records, image_size=image_size, name=name, masks_expected=has_gt)
    return ds
