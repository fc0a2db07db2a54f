"""Datasets of the book, all behind one function.

>>> from uadkit.data import get_dataset
>>> train = get_dataset("mini/brick", "train")          # embedded, no download
>>> test = get_dataset("mvtec/bottle", "test")          # $UADKIT_DATA/mvtec/bottle/...

Names
-----
``mini/<category>``    the embedded ``uadkit-mini`` benchmark (built in memory, cached)
``digits/<k>``         one-vs-all on scikit-learn's 8×8 digits, upsampled
``fashion/<k>``        one-vs-all on Fashion-MNIST (Debian package or torchvision layout)
``mvtec/<category>``   MVTec AD folder layout
``visa/<category>``    VisA with its split CSV
``folder/<path>``      any MVTec-style tree (BMAD, Uni-Medical, converted sets)
``cifar10/<k>``, ``cifar100/<k>``   one-vs-all from torchvision's on-disk format
``cub200/<k>``         one-vs-all on CUB-200-2011's 200 bird classes (:mod:`uadkit.data.cub`)
``covidx/all``         Covid-X chest X-rays, image labels only (:mod:`uadkit.data.medical`)
``hyper-kvasir/all``   Hyper-Kvasir colonoscopy, polyps with masks (:mod:`uadkit.data.medical`)
``bmad/<set>``         BMAD: brats2021, liverct, resc (masks), rsna (labels) (:mod:`uadkit.data.medical`)

Every item is a dict with ``image``, ``label``, ``mask``, ``category``, ``path``
(see :mod:`uadkit.data.base`).
"""
from __future__ import annotations

from typing import Iterable

from torch.utils.data import ConcatDataset, Dataset

from .base import (  # noqa: F401
    ArrayDataset,
    DatasetUnavailable,
    FileDataset,
    Record,
    UnknownDataset,
    collate,
    data_root,
    loader,
    load_image,
    load_mask,
    stack,
)

__all__ = [
    "get_dataset",
    "multiclass",
    "available",
    "DatasetUnavailable",
    "UnknownDataset",
    "ArrayDataset",
    "FileDataset",
    "collate",
    "loader",
    "stack",
]

SPLITS = ("train", "test")
_KINDS = ("mini", "digits", "fashion", "mvtec", "visa", "folder", "cifar10", "cifar100", "covidx", "hyper-kvasir", "bmad",
          "cub200")


def available() -> dict[str, list[str]]:
    """The dataset kinds and, where fixed, their categories."""
    from . import folders, mini

    return {
        "mini": list(mini.MINI_CATEGORIES),
        "digits": [str(k) for k in range(10)],
        "fashion": [str(k) for k in range(10)],
        "mvtec": list(folders.MVTEC_CATEGORIES),
        "visa": list(folders.VISA_CATEGORIES),
        "folder": ["<path to an MVTec-style tree>"],
        "cifar10": [str(k) for k in range(10)],
        "cifar100": [str(k) for k in range(20)],
        "covidx": ["all"],
        "hyper-kvasir": ["all"],
        "bmad": ["brats2021", "liverct", "liverct-roi", "resc", "rsna"],
        "cub200": [str(k) for k in range(200)],
    }


def _class_index(kind: str, cat: str, n: int) -> int:
    try:
        k = int(cat)
    except ValueError:
        k = -1
    if not 0 <= k < n:
        raise UnknownDataset(f"{kind}/{cat}: the normal class must be an integer in 0..{n - 1}")
    return k


def get_dataset(name: str, split: str, *, root=None, image_size: int | None = None, **kw) -> Dataset:
    """Return the ``split`` ("train" or "test") of dataset ``name``.

    ``root`` overrides ``$UADKIT_DATA``; ``image_size`` resizes to a square
    (default: 64 for ``mini``/``digits``, 256 for MVTec/VisA/folder, 32 for CIFAR).
    Extra keywords go to the loader (e.g. ``n_train`` for ``mini``).
    """
    if split not in SPLITS and not (str(name).startswith("bmad/") and split == "valid"):
        raise ValueError(f"split must be one of {SPLITS} (BMAD also has 'valid'), got {split!r}")
    if not isinstance(name, str) or "/" not in name:
        raise UnknownDataset(f"dataset name must look like '<kind>/<category>', got {name!r}; kinds: {', '.join(_KINDS)}")
    kind, cat = name.split("/", 1)
    if kind == "mini":
        from . import mini

        return mini.mini(cat, split, image_size=image_size or 64, **kw)
    if kind == "digits":
        from . import mini

        return mini.digits(_class_index(kind, cat, 10), split, image_size=image_size or 64, **kw)
    if kind in ("mvtec", "visa", "folder"):
        from . import folders

        loader = getattr(folders, kind)
        return loader(cat, split, root=root, image_size=image_size or 256, **kw)
    if kind == "fashion":
        from . import fashion

        return fashion.fashion(_class_index(kind, cat, 10), split, root=root, image_size=image_size or 32, **kw)
    if kind in ("cifar10", "cifar100"):
        from . import oneclass

        n = 10 if kind == "cifar10" else 20  # CIFAR-100: the 20 super-classes, as in the AD literature
        return oneclass.cifar(_class_index(kind, cat, n), split, root=root, image_size=image_size or 32,
                              num_classes=int(kind[5:]), **kw)
    if kind in ("covidx", "hyper-kvasir"):
        from . import medical

        if cat != "all":
            raise UnknownDataset(f"{kind} has one category, 'all'; got {name!r}")
        load = medical.covidx if kind == "covidx" else medical.hyper_kvasir
        return load(split, root=root, image_size=image_size or 224, **kw)
    if kind == "bmad":
        from . import medical

        if cat not in medical.BMAD_SETS:
            raise UnknownDataset(f"bmad has categories {', '.join(medical.BMAD_SETS)}; got {name!r}")
        return medical.bmad(cat, split, root=root, image_size=image_size or 224, **kw)
    if kind == "cub200":
        from . import cub

        return cub.cub(_class_index(kind, cat, cub.NUM_CLASSES), split, root=root, image_size=image_size or 224, **kw)
    raise UnknownDataset(f"unknown dataset kind {kind!r} in {name!r}; kinds: {', '.join(_KINDS)}")


def multiclass(names: Iterable[str], split: str, **kw) -> ConcatDataset:
    """Concatenate several categories for one-model-for-all training (UniAD / MDD-Net protocol).

    Every item keeps its own ``category``, so class-aware methods can read it.
    """
    names = list(names)
    if not names:
        raise ValueError("multiclass() needs at least one dataset name")
    parts = [get_dataset(n, split, **kw) for n in names]
    sizes = {tuple(p[0]["image"].shape) for p in parts if len(p)}
    if len(sizes) > 1:
        raise ValueError(f"categories have different image sizes {sorted(sizes)}; pass image_size=")
    out = ConcatDataset(parts)
    out.names = names  # type: ignore[attr-defined]
    return out
