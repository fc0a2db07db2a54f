"""Fashion-MNIST one-vs-all: ``fashion/<k>``, real photographs of 10 clothing classes.

Read from the IDX files of Debian's package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``) or, e.g. in Colab, from torchvision's
on-disk layout ``$UADKIT_DATA/fashion/FashionMNIST/raw/``. Never downloaded at run time.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np

from .base import ArrayDataset, DatasetUnavailable, data_root, one_vs_all

__all__ = ["CLASSES", "fashion", "read_idx", "find_files"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OSError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise OSError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise OSError(f"{path}: header says {dims}, file holds {data.size} values")
    return data.reshape(dims)


def find_files(root=None) -> list[Path]:
    """The four IDX files: under ``$UADKIT_DATA/fashion`` (torchvision layout) first, else Debian's."""
    candidates = [data_root(root) / "fashion" / "FashionMNIST" / "raw", data_root(root) / "fashion", DEBIAN_DIR]
    for folder in candidates:
        found = []
        for stem in _FILES:
            hits = [folder / f"{stem}{ext}" for ext in ("", ".gz") if (folder / f"{stem}{ext}").is_file()]
            if not hits:
                break
            found.append(hits[0])
        if len(found) == 4:
            return found
    raise DatasetUnavailable(
        "fashion: Fashion-MNIST files not found in " + ", ".join(str(c) for c in candidates) + ".\n"
        "Install them with    sudo apt-get install dataset-fashion-mnist    (Debian/Ubuntu; `make setup` does this),\n"
        "or put torchvision's FashionMNIST/raw/ folder under $UADKIT_DATA/fashion/."
    )


@lru_cache(maxsize=2)
def _arrays(root_key: str | None):
    xtr, ytr, xte, yte = (read_idx(p) for p in find_files(root_key))
    return (xtr[:, None], ytr.astype(np.int64)), (xte[:, None], yte.astype(np.int64))


def fashion(k: int, split: str, *, root=None, image_size: int = 32, seed: int = 0) -> ArrayDataset:
    """Fashion-MNIST one-vs-all: train on class ``k`` (6,000 images), test on its 1,000 test
    images plus 1,000 drawn from the other classes. Images 28×28 grey, resized to ``image_size``."""
    train, test = _arrays(None if root is None else str(root))
    return one_vs_all(train, test, k, split, image_size=image_size, name=f"fashion/{k}", seed=seed)
