"""CUB-200-2011 (Wah et al., 2011) one-vs-all, read from the published archive's layout:
``$UADKIT_DATA/cub200/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, images/}``,
as ``python -m uadkit.fetch cub`` leaves it. Classes are numbered 0..199 (the files count from 1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DatasetUnavailable, FileDataset, Record, data_root

__all__ = ["cub", "NUM_CLASSES"]

NUM_CLASSES = 200
_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def _table(path: Path) -> dict[int, str]:
    rows = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {int(i): v.strip() for i, v in rows}


def _index(base: Path) -> list[tuple[str, int, bool]]:
    """(image path, class 0..199, is_train) for every image of the archive."""
    missing = [f for f in _FILES if not (base / f).is_file()]
    if missing:
        raise DatasetUnavailable(f"cub200: {base / missing[0]} not found. Prepare it with\n"
                                 f"    python -m uadkit.fetch cub --root {base.parent.parent}")
    images, classes, split = (_table(base / f) for f in _FILES)
    return [(str(base / "images" / images[i]), int(classes[i]) - 1, split[i] == "1") for i in sorted(images)]


def cub(k: int, split: str, *, root=None, image_size: int = 224, seed: int = 0) -> FileDataset:
    """One-vs-all: train on the training images of class ``k``; test on its test images (label 0)
    plus as many test images drawn with ``seed`` from the 199 other classes (label 1)."""
    base = data_root(root) / "cub200" / "CUB_200_2011"
    index = _index(base)
    name = f"cub200/{k}"
    if split == "train":
        records = [Record(p, 0, name) for p, c, tr in index if tr and c == k]
    else:
        test = [(p, c) for p, c, tr in index if not tr]
        normal = [p for p, c in test if c == k]
        others = [p for p, c in test if c != k]
        pick = np.sort(np.random.default_rng([seed, k]).choice(len(others), size=min(len(normal), len(others)),
                                                                replace=False))
        records = [Record(p, 0, name) for p in normal] + [Record(others[i], 1, name) for i in pick]
    if not records:
        raise DatasetUnavailable(f"{name}: no {split} images of class {k} under {base}")
    return FileDataset(records, image_size=image_size, name=name, masks_expected=False)
