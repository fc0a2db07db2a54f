"""CIFAR-10 / CIFAR-100 one-vs-all, read from torchvision's on-disk format (never downloaded here).

``$UADKIT_DATA/cifar10/cifar-10-batches-py/`` and ``$UADKIT_DATA/cifar100/cifar-100-python/``,
as ``python -m uadkit.fetch cifar`` leaves them. CIFAR-100 uses its 20 super-classes,
as the anomaly-detection literature does.
"""
from __future__ import annotations

import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

from .base import ArrayDataset, DatasetUnavailable, data_root, one_vs_all

__all__ = ["cifar"]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise OSError(f"cannot read CIFAR batch file {path}: {e}") from e


def _images(batch: dict) -> np.ndarray:
    return np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)


@lru_cache(maxsize=2)
def _arrays(base: str, num_classes: int):
    base = Path(base)
    if num_classes == 10:
        folder = base / "cifar-10-batches-py"
        files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
        key = "labels"
    else:
        folder = base / "cifar-100-python"
        files = [folder / "train", folder / "test"]
        key = "coarse_labels"
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetUnavailable(f"cifar{num_classes}: {missing[0]} not found. Prepare it with\n"
                                 f"    python -m uadkit.fetch cifar --root {base.parent}")
    batches = [_unpickle(f) for f in files]
    train, test = batches[:-1], batches[-1]
    xtr = np.concatenate([_images(b) for b in train])
    ytr = np.concatenate([np.asarray(b[key]) for b in train])
    return (xtr, ytr), (_images(test), np.asarray(test[key]))


def cifar(k: int, split: str, *, root=None, image_size: int = 32, num_classes: int = 10, seed: int = 0) -> ArrayDataset:
    """One-vs-all: train on class ``k``; test on its test images plus as many from the other classes."""
    base = data_root(root) / f"cifar{num_classes}"
    train, test = _arrays(str(base), num_classes)
    return one_vs_all(train, test, k, split, image_size=image_size, name=f"cifar{num_classes}/{k}", seed=seed)
