"""What every dataset in the book has in common.

A dataset is a ``torch.utils.data.Dataset`` whose items are dicts::

    {"image": float32 3×H×W in [0, 1],   # grey images are repeated to 3 channels
     "label": int,                       # 0 normal, 1 anomalous
     "mask": float32 1×H×W in {0, 1},    # zeros where no mask exists
     "category": str,
     "path": str | None}

Two concrete kinds exist: :class:`FileDataset` reads images from disk (MVTec AD,
VisA, any MVTec-style folder, CIFAR) and :class:`ArrayDataset` holds images that
were built in memory (``uadkit-mini``, digits).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DatasetUnavailable",
    "UnknownDataset",
    "Record",
    "FileDataset",
    "ArrayDataset",
    "data_root",
    "cache_dir",
    "load_image",
    "load_mask",
    "collate",
    "loader",
    "stack",
]


class DatasetUnavailable(FileNotFoundError):
    """A dataset's files are not on this machine. The message says how to get them."""


class UnknownDataset(ValueError):
    """An unknown dataset name or category. The message lists the valid ones."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where real datasets live: ``root`` if given, else ``$UADKIT_DATA``, else ``~/uadkit_data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("UADKIT_DATA", "~/uadkit_data")).expanduser()


def cache_dir() -> Path:
    """Where ``uadkit`` caches what it builds (``$UADKIT_CACHE``, default ``~/.cache/uadkit``)."""
    path = Path(os.environ.get("UADKIT_CACHE", "~/.cache/uadkit")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing_root_error(name: str, root: Path, command: str) -> DatasetUnavailable:
    """``command``: the ``python -m uadkit.fetch`` name that prepares the dataset."""
    return DatasetUnavailable(
        f"{name}: no dataset at {root}. Prepare it with\n"
        f"    python -m uadkit.fetch {command} --root {root.parent}\n"
        f"(or set UADKIT_DATA to the folder that holds '{root.name}/')."
    )


def _resize(img: Image.Image, size: int | None, resample) -> Image.Image:
    if size is None or img.size == (size, size):
        return img
    return img.resize((size, size), resample)


def _wide_grey(im: Image.Image, path) -> np.ndarray | None:
    """A 16-bit, 32-bit integer or float grey image as float32 H×W in [0, 1]; None for 8-bit modes.

    16-bit ("I;16…") images, and 32-bit integer ("I") ones whose values fit 0..65535 (how PIL opens
    16-bit PNGs), are divided by 65535; "I" images with other values (CT in Hounsfield units, say) are
    an error, since no fixed scale is right for them. Float ("F") images are taken as given and clipped
    to [0, 1], with a warning when anything was outside (NaN counts as 0)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"32-bit integer pixels from {arr.min():.0f} to {arr.max():.0f} have no fixed scale to [0, 1]; "
                             "convert the image to 8 or 16 bits (e.g. after a CT window) first")
        return (arr / 65535).astype(np.float32)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            warnings.warn(f"{path}: float pixels outside [0, 1] (from {np.nanmin(arr):.3g} to {np.nanmax(arr):.3g}) "
                          "are clipped to it", stacklevel=3)
            arr = np.clip(np.nan_to_num(arr, nan=0.0), 0, 1)
        return arr
    return None


def load_image(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """Read an image file as float32 3×H×W in [0, 1]; grey is repeated to 3 channels.

    8-bit images (grey, palette, RGB; an alpha channel is dropped) are divided by 255; 16-bit grey
    images by 65535; float images are taken as given (clipped to [0, 1], with a warning); 32-bit
    integer images outside 0..65535 are refused (see :func:`_wide_grey`)."""
    try:
        with Image.open(path) as im:
            grey = _wide_grey(im, path)
            if grey is None:
                im = _resize(im.convert("RGB"), size, Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
            else:  # resized in float, so that no precision is lost to 8 bits
                grey = np.asarray(_resize(Image.fromarray(grey, mode="F"), size, Image.BILINEAR), dtype=np.float32)
                arr = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
    except (OSError, ValueError, SyntaxError) as e:
        raise OSError(f"cannot read image file {path}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


LOSSY_SUFFIXES = {".jpg", ".jpeg"}


def load_mask(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """Read a ground-truth mask file as float32 1×H×W in {0, 1}.

    A pixel is anomalous where the mask is non-zero (grey value; in a JPEG, whose compression leaves
    faint noise, where it is at least half-bright). In a mask with transparency (RGBA, LA, a palette
    with a transparent colour) that is not opaque everywhere, the opaque pixels are the anomaly."""
    try:
        with Image.open(path) as im:
            grey = im.convert("L")
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                alpha = im.convert("RGBA").getchannel("A")
                if alpha.getextrema()[0] < 255:  # transparency is used: it marks where the defect is not
                    grey = alpha
            threshold = 127 if Path(path).suffix.lower() in LOSSY_SUFFIXES else 0
            arr = (np.asarray(_resize(grey, size, Image.NEAREST)) > threshold).astype(np.float32)
    except (OSError, ValueError, SyntaxError) as e:
        raise OSError(f"cannot read mask file {path}: {e}") from e
    return torch.from_numpy(arr)[None]


def _pixel_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size  # (width, height), read from the header only


@dataclass(frozen=True)
class Record:
    """One image on disk. ``mask`` is None for normal images and for sets without masks."""

    image: str
    label: int
    category: str
    mask: str | None = None


class FileDataset(Dataset):
    """Images read lazily from disk, resized to ``image_size`` × ``image_size``.

    ``masks_expected``: anomalous images must have a mask file (MVTec AD, VisA); a
    missing one is an error naming the image. One-vs-all sets pass False and get
    all-zero masks.
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        image_size: int | None,
        name: str,
        masks_expected: bool,
    ):
        self.records = list(records)
        self.image_size = image_size
        self.name = name
        self.masks_expected = masks_expected
        self.has_masks = masks_expected
        if masks_expected:
            for r in self.records:
                if r.label == 1 and r.mask is None:
                    raise DatasetUnavailable(
                        f"{name}: anomalous test image {r.image} has no ground-truth mask"
                    )
                if r.mask is not None and not Path(r.mask).is_file():
                    raise DatasetUnavailable(
                        f"{name}: mask file {r.mask} for {r.image} does not exist"
                    )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        image = load_image(r.image, self.image_size)
        if r.mask is not None:
            (iw, ih), (mw, mh) = _pixel_size(r.image), _pixel_size(r.mask)
            if (iw, ih) != (mw, mh):  # resizing it would only hide that it belongs to another image
                raise ValueError(f"{self.name}: mask {r.mask} is {mw}×{mh} pixels but its image {r.image} is "
                                 f"{iw}×{ih}; a mask must have its image's size")
            mask = load_mask(r.mask, self.image_size)
        else:
            mask = torch.zeros(1, *image.shape[-2:])
        return {"image": image, "label": int(r.label), "mask": mask, "category": r.category, "path": r.image}

    def __repr__(self) -> str:
        n1 = int(self.labels.sum()) if self.records else 0
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, anomalous={n1}, image_size={self.image_size})"


class ArrayDataset(Dataset):
    """Images held in memory: ``images`` N×3×H×W in [0,1], ``labels`` N, ``masks`` N×1×H×W."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | np.ndarray,
        masks: torch.Tensor | None,
        *,
        category: str | Sequence[str],
        name: str,
        has_masks: bool = True,
    ):
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be N×3×H×W, got {tuple(images.shape)}")
        self.images = images
        self._labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if masks is None:
            masks = torch.zeros(images.shape[0], 1, *images.shape[-2:])
        self.masks = torch.as_tensor(masks, dtype=torch.float32)
        n = len(images)
        if len(self._labels) != n or len(self.masks) != n:
            raise ValueError("images, labels and masks must have the same length")
        self.categories = [category] * n if isinstance(category, str) else list(category)
        self.name = name
        self.has_masks = has_masks
        self.image_size = images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        return self._labels.numpy().copy()

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "label": int(self._labels[i]),
            "mask": self.masks[i],
            "category": self.categories[i],
            "path": None,
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, n={len(self)}, "
                f"anomalous={int(self._labels.sum())}, image_size={self.image_size})")


def collate(items: list[dict]) -> dict:
    """Batch a list of item dicts: tensors are stacked, ints become a tensor, the rest stay lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def stack(dataset, key: str = "mask", indices=None) -> torch.Tensor:
    """Items ``key`` ("image", "mask" or "label") of ``dataset`` stacked into one tensor, for the
    items ``indices`` (default: all). Works for every dataset of the book, including file-backed
    ones that hold no tensors (MVTec AD, VisA, folders), which read each item from disk here.

    >>> masks = stack(test, "mask")                       # N×1×H×W, for the pixel metrics
    >>> images = stack(test, "image", indices=[0, 5])     # 2×3×H×W, for a figure
    """
    idx = range(len(dataset)) if indices is None else [int(i) for i in indices]
    if key == "label":
        return torch.tensor([int(dataset[i]["label"]) for i in idx], dtype=torch.int64)
    held = {"image": "images", "mask": "masks"}.get(key)
    if held is None:
        raise KeyError(f"stack() stacks 'image', 'mask' or 'label', not {key!r}")
    if isinstance(getattr(dataset, held, None), torch.Tensor):  # in memory: index, don't copy item by item
        return getattr(dataset, held)[list(idx)] if indices is not None else getattr(dataset, held)
    items = [dataset[i][key] for i in idx]
    if not items:
        raise ValueError("stack() of no items")
    return torch.stack(items)


def loader(dataset, *, batch_size: int = 32, shuffle: bool = False, seed: int = 0, num_workers: int = 0, drop_last=False):
    """A DataLoader over item dicts, repeatable: shuffling draws from its own seeded generator."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=collate,
                      num_workers=num_workers, drop_last=drop_last)


def one_vs_all(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], k: int, split: str, *,
               image_size: int, name: str, seed: int = 0) -> ArrayDataset:
    """The one-vs-all protocol of the CIFAR-10 anomaly-detection literature (e.g. ADTR, Kwon et al.).

    ``train``/``test`` are (images N×C×h×w uint8, class labels N). Normal = class ``k``.
    Train: the training images of class ``k``. Test: the test images of class ``k``
    (label 0) and as many test images drawn, with ``seed``, from the other classes
    (label 1). Images are resized to ``image_size`` and grey is repeated to 3 channels.
    """
    if split == "train":
        x, y = train[0][train[1] == k], np.zeros(int((train[1] == k).sum()), np.int64)
    else:
        xs, ys = test
        normal, others = np.flatnonzero(ys == k), np.flatnonzero(ys != k)
        pick = np.sort(np.random.default_rng([seed, k]).choice(others, size=len(normal), replace=False))
        x = np.concatenate([xs[normal], xs[pick]])
        y = np.r_[np.zeros(len(normal)), np.ones(len(pick))].astype(np.int64)
    t = torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0
    if t.shape[-1] != image_size or t.shape[-2] != image_size:
        t = torch.nn.functional.interpolate(t, size=(image_size, image_size), mode="bilinear",
                                            antialias=True, align_corners=False).clamp(0, 1)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1).contiguous()
    return ArrayDataset(t, y, None, category=name, name=name, has_masks=False)
