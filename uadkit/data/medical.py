"""Medical anomaly-detection sets: Covid-X and Hyper-Kvasir (MemMC-MAE), BMAD (QFAE).

Covid-X (COVIDx CXR), ``$UADKIT_DATA/covidx/``::

    train/*.png|jpg   test/*.png|jpg   train.txt   test.txt

``train.txt`` / ``test.txt`` are the label files distributed with the images, one image per
line, whitespace-separated ``<patient id> <file name> <class> <source>`` with class
``positive`` or ``negative``. Normal = negative. The training split keeps the negative
images only (the paper trains on the 13,794 negatives); the test split keeps all (the paper's
400 = 200 positive + 200 negative). Image-level labels only: no masks.

Hyper-Kvasir, ``$UADKIT_DATA/hyper-kvasir/`` holding the two official archives unpacked::

    labeled-images/.../cecum/*.jpg   .../ileum/*.jpg   .../bbps-2-3/*.jpg        (normal)
    segmented-images/images/*.jpg    segmented-images/masks/*.jpg              (polyps + masks)

Following the paper (and CCD, its ref. [30]), the normal images of ``cecum``, ``ileum`` and
``bbps-2-3`` are pooled and split with a fixed seed into ``n_train`` (1,600) training and the
rest (500) test images; the test split adds the 1,000 polyp images with their masks. The
folders are found by name anywhere under the root, so either archive layout works.
The masks are JPEGs: a pixel is anomalous when its grey value is above 127.

BMAD (Bao et al., 2024), ``$UADKIT_DATA/bmad/<Brain|Liver|RESC|Chest>/``, the layout the QFAE
code reads::

    train/good/img/*.png
    valid|test/good/img/*.png   [good/label/]   valid|test/Ungood/img/*.png   Ungood/label/*.png

``bmad/brats2021`` (Brain), ``bmad/liverct`` (Liver), ``bmad/resc`` (RESC) have pixel masks in
``Ungood/label`` (same file name as the image; a pixel is anomalous above grey 127);
``bmad/rsna`` (Chest) has image-level labels only. ``bmad/liverct-roi`` reads ``Liver_roi/``,
written by ``python -m uadkit.fetch bmad --liver-roi`` (QFAE's LiverCT preprocessing).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import DatasetUnavailable, FileDataset, Record, UnknownDataset, data_root, load_image, missing_root_error
from .folders import _images  # the folder rules: hidden entries skipped, image suffixes only

__all__ = ["covidx", "hyper_kvasir", "bmad", "KVASIR_NORMAL", "BMAD_SETS", "ThresholdMaskDataset"]

KVASIR_NORMAL = ("cecum", "ileum", "bbps-2-3")
# name -> folder under bmad/; "liverct-roi" is Liver after QFAE's Sec. 7.1 preprocessing
# (python -m uadkit.fetch bmad --liver-roi)
BMAD_SETS = {"brats2021": "Brain", "liverct": "Liver", "liverct-roi": "Liver_roi", "resc": "RESC", "rsna": "Chest"}
_BMAD_MASKS = {"brats2021", "liverct", "liverct-roi", "resc"}


class ThresholdMaskDataset(FileDataset):
    """A :class:`FileDataset` whose masks are binarised at grey value > ``threshold`` (JPEG masks
    have compression noise around 0, which the default "any non-zero pixel" rule would count)."""

    def __init__(self, records, *, threshold: int = 127, **kw):
        super().__init__(records, **kw)
        self.threshold = threshold

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        if r.mask is None:
            return super().__getitem__(i)
        image = load_image(r.image, self.image_size)
        try:
            with Image.open(r.mask) as im:
                im = im.convert("L").resize(tuple(image.shape[-2:][::-1]), Image.NEAREST)
                mask = torch.from_numpy((np.asarray(im) > self.threshold).astype(np.float32))[None]
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read mask file {r.mask}: {e}") from e
        return {"image": image, "label": int(r.label), "mask": mask, "category": r.category, "path": r.image}


def covidx(split: str, *, root=None, image_size: int | None = 224) -> FileDataset:
    """Covid-X: normal = Covid-19 negative chest X-rays. ``split`` is "train" or "test"."""
    base = data_root(root) / "covidx"
    labels = base / f"{split}.txt"
    if not labels.is_file():
        raise missing_root_error("covidx", base, "covidx")
    records = []
    for n, line in enumerate(labels.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3 or parts[2].lower() not in ("positive", "negative"):
            raise DatasetUnavailable(f"covidx: line {n} of {labels} is not '<patient> <file> <positive|negative> ...': "
                                     f"{line!r}")
        label = int(parts[2].lower() == "positive")
        if split == "train" and label:
            continue  # normal-only training set
        path = base / split / parts[1]
        if not path.is_file():
            raise DatasetUnavailable(f"covidx: {labels} lists {parts[1]}, but {path} does not exist")
        records.append(Record(str(path), label, "covidx", None))
    if not records:
        raise DatasetUnavailable(f"covidx: no usable rows in {labels}")
    ds = FileDataset(records, image_size=image_size, name="covidx", masks_expected=False)
    return ds


def _find_dirs(base: Path, name: str) -> list[Path]:
    return sorted(p for p in base.rglob(name) if p.is_dir())


def hyper_kvasir(split: str, *, root=None, image_size: int | None = 224, n_train: int = 1600,
                 seed: int = 0) -> FileDataset:
    """Hyper-Kvasir: normal = cecum + ileum + bbps-2-3; anomalies = the segmented polyps (with masks)."""
    base = data_root(root) / "hyper-kvasir"
    if not base.is_dir():
        raise missing_root_error("hyper-kvasir", base, "hyper_kvasir")
    normal = []
    for name in KVASIR_NORMAL:
        dirs = _find_dirs(base, name)
        if not dirs:
            raise DatasetUnavailable(f"hyper-kvasir: no '{name}' folder under {base} (unpack "
                                     "hyper-kvasir-labeled-images.zip there; "
                                     "python -m uadkit.fetch hyper_kvasir does)")
        normal += [p for d in dirs for p in _images(d)]
    normal = sorted(normal, key=lambda p: p.name)
    if len(normal) <= n_train:
        raise DatasetUnavailable(f"hyper-kvasir: {len(normal)} normal images, but n_train={n_train} of them are "
                                 "needed for training and some for testing")
    order = np.random.default_rng(seed).permutation(len(normal))
    chosen = order[:n_train] if split == "train" else order[n_train:]
    records = [Record(str(normal[i]), 0, "hyper-kvasir", None) for i in sorted(chosen)]
    if split == "test":
        seg = [d for d in _find_dirs(base, "segmented-images")]
        if not seg or not (seg[0] / "images").is_dir() or not (seg[0] / "masks").is_dir():
            raise DatasetUnavailable(f"hyper-kvasir: no segmented-images/images and /masks under {base} (unpack "
                                     "hyper-kvasir-segmented-images.zip there; "
                                     "python -m uadkit.fetch hyper_kvasir does)")
        masks = {p.stem: p for p in _images(seg[0] / "masks")}
        for img in _images(seg[0] / "images"):
            if img.stem not in masks:
                raise DatasetUnavailable(f"hyper-kvasir: polyp image {img} has no mask in {seg[0] / 'masks'}")
            records.append(Record(str(img), 1, "hyper-kvasir", str(masks[img.stem])))
    return ThresholdMaskDataset(records, image_size=image_size, name="hyper-kvasir", masks_expected=(split == "test"))



def bmad(name: str, split: str, *, root=None, image_size: int | None = 224) -> FileDataset:
    """A BMAD set (``brats2021``, ``liverct``, ``resc``, ``rsna``); ``split`` "train", "valid" or "test"."""
    if name not in BMAD_SETS:
        raise UnknownDataset(f"bmad: unknown set {name!r}; one of {', '.join(BMAD_SETS)}")
    base = data_root(root) / "bmad" / BMAD_SETS[name]
    if not base.is_dir():
        raise DatasetUnavailable(
            f"bmad/{name}: no dataset at {base}. BMAD needs a manual download; see\n"
            f"    python -m uadkit.fetch bmad --root {data_root(root)}\n"
            f"(or set UADKIT_DATA to the folder that holds 'bmad/{BMAD_SETS[name]}/').")
    if split not in ("train", "valid", "test"):
        raise DatasetUnavailable(f"bmad/{name}: split must be 'train', 'valid' or 'test', got {split!r}")
    groups = [("good", 0)] if split == "train" else [("good", 0), ("Ungood", 1)]
    has_masks = name in _BMAD_MASKS and split != "train"
    records = []
    for folder, label in groups:
        img_dir = base / split / folder / "img"
        images = _images(img_dir)
        if not images:
            raise DatasetUnavailable(f"bmad/{name}: no images in {img_dir} (expected the BMAD layout "
                                     f"{split}/{folder}/img/; see python -m uadkit.fetch bmad --help)")
        for img in images:
            mask = None
            if label and has_masks:
                mask = base / split / folder / "label" / img.name
                if not mask.is_file():
                    alt = [p for p in _images(mask.parent) if p.stem == img.stem]
                    if not alt:
                        raise DatasetUnavailable(f"bmad/{name}: anomalous image {img} has no mask in {mask.parent}")
                    mask = alt[0]
                mask = str(mask)
            records.append(Record(str(img), label, f"bmad/{name}", mask))
    return ThresholdMaskDataset(records, image_size=image_size, name=f"bmad/{name}", masks_expected=has_masks)
