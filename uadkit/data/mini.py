"""``uadkit-mini``: a small real-image anomaly benchmark that needs no download.

Every image comes from pictures that ship inside the scikit-image and
scikit-learn wheels, so the book runs anywhere ``pip`` works.

================  ==========================  ===================================
category          source (``skimage.data``)   how images are made
================  ==========================  ===================================
``brick``         ``brick()`` 512² grey       random 128² crops, left/right split
``grass``         ``grass()`` 512² grey       random 128² crops, left/right split
``gravel``        ``gravel()`` 512² grey      random 128² crops, left/right split
``retina``        ``retina()`` 1411² fundus   random 256² crops inside the field
                                              of view, top/bottom split
``histology``     ``immunohistochemistry()``  random 128² crops, left/right split
``phantom``       ``shepp_logan_phantom()``   whole slice, random affine + elastic
                                              jitter, gamma, contrast and noise
``brain``         MNI152 T1 template          axial slices 60–120 (nilearn's copy),
                  (nilearn, read by nibabel)  even slices train / odd slices test,
                                              the same jitter as ``phantom``
================  ==========================  ===================================

Train images come from one region of the source picture (left 55 %, or top half
for the retina) and test images from the other, so no test pixel was seen in
training. Half the test images receive one held-out defect from
:mod:`uadkit.data.defects` (textures: scratch, stain, hole, foreign patch, warp;
medical: bright spots, dark blob, lesion), with its exact mask; the defect kinds
are cycled so each is equally frequent, and ``dataset.defects`` names the one
each test image got ("good" for normal ones).

Everything is deterministic given ``seed``; one category builds in about a second.

``digits/<k>`` (scikit-learn's 8×8 handwritten digits, upsampled) is the
lightest one-vs-all set: normal = class ``k``, anomalies = the other classes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from . import defects as D
from .base import ArrayDataset, DatasetUnavailable, UnknownDataset, one_vs_all

__all__ = ["MINI_CATEGORIES", "TEXTURES", "MEDICAL", "mini", "digits", "source_image"]

TEXTURES = ("brick", "grass", "gravel")
MEDICAL = ("retina", "histology", "phantom", "brain")
MINI_CATEGORIES = TEXTURES + MEDICAL

_CROP = {"brick": 128, "grass": 128, "gravel": 128, "histology": 128, "retina": 256}
_TRAIN_FRACTION = 0.55


def source_image(category: str) -> torch.Tensor:
    """The bundled picture a category is cut from, float 3×H×W in [0, 1]."""
    import skimage.data as sk

    fn = {
        "brick": sk.brick, "grass": sk.grass, "gravel": sk.gravel, "retina": sk.retina,
        "histology": sk.immunohistochemistry, "phantom": sk.shepp_logan_phantom,
    }[category]
    arr = np.asarray(fn(), dtype=np.float32)
    if arr.max() > 1.5:
        arr = arr / 255.0
    t = torch.from_numpy(arr)
    return t.expand(3, *t.shape).contiguous() if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Batch resize N×3×h×w → N×3×size×size with antialiasing."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _crop_boxes(category: str, src: torch.Tensor, split: str, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` random crops that lie wholly inside the split's region."""
    c = _CROP[category]
    _, h, w = src.shape
    if category == "retina":  # top half for training, bottom half for testing, inside the fundus disc
        fov = src.mean(0) > 0.08
        y_lo, y_hi = (0, h // 2 - c) if split == "train" else (h // 2, h - c)
        x_lo, x_hi = 0, w - c
    else:
        cut = int(_TRAIN_FRACTION * w)
        y_lo, y_hi = 0, h - c
        x_lo, x_hi = (0, cut - c) if split == "train" else (cut, w - c)
    boxes = []
    while len(boxes) < n:
        y, x = int(rng.integers(y_lo, y_hi + 1)), int(rng.integers(x_lo, x_hi + 1))
        if category == "retina" and fov[y:y + c, x:x + c].float().mean() < 0.995:
            continue
        boxes.append((y, x))
    return boxes


def _crops(category: str, split: str, n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    src = source_image(category)
    c = _CROP[category]
    out = torch.stack([src[:, y:y + c, x:x + c] for y, x in _crop_boxes(category, src, split, n, rng)])
    if category != "retina":  # textures and tissue have no left/right: flips add variety
        flip = torch.from_numpy(rng.random(n) < 0.5)
        out[flip] = out[flip].flip(-1)
    return _resize(out, size)


def brain_slices(split: str) -> torch.Tensor:
    """Axial slices of the MNI152 T1 template (shipped in nilearn), K×1×H×W in [0, 1].

    Slices 60–120 (the cerebrum, with ventricles); even slices for training, odd ones
    for testing, so no test slice was seen in training.
    """
    import importlib.util

    import nibabel

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DatasetUnavailable("mini/brain needs the MNI152 template shipped in nilearn: pip install nilearn")
    from pathlib import Path

    path = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    volume = np.asarray(nibabel.load(path).get_fdata(), dtype=np.float32)  # 197×233×189, x·y·z
    z = np.arange(60, 121, 2) if split == "train" else np.arange(61, 121, 2)
    slices = np.rot90(volume[:, :, z], k=1, axes=(0, 1)).transpose(2, 0, 1)  # K×233×197, nose up
    side = max(slices.shape[1:])
    pad_y, pad_x = side - slices.shape[1], side - slices.shape[2]
    slices = np.pad(slices, ((0, 0), (pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2)))
    return torch.from_numpy(slices / slices.max())[:, None].float()


def _jittered(base: torch.Tensor, n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` variations of slices ``base`` (K×1×H×W): a random slice each, then affine + smooth
    elastic jitter, gamma, contrast and noise: anatomy-like variation that keeps the anatomy."""
    base = _resize(base.expand(-1, 3, -1, -1), 2 * size)[:, :1]
    base = base[torch.from_numpy(rng.integers(len(base), size=n))]
    angle = rng.uniform(-0.15, 0.15, n)
    scale = rng.uniform(0.92, 1.08, (n, 2))
    shift = rng.uniform(-0.05, 0.05, (n, 2))
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = np.cos(angle) / scale[:, 0], -np.sin(angle) / scale[:, 0]
    theta[:, 1, 0], theta[:, 1, 1] = np.sin(angle) / scale[:, 1], np.cos(angle) / scale[:, 1]
    theta[:, :, 2] = shift
    grid = F.affine_grid(torch.from_numpy(theta), (n, 1, size, size), align_corners=False)
    coarse = torch.from_numpy(rng.normal(0, 0.025, (n, 2, 5, 5)).astype(np.float32))
    grid = grid + F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    img = F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.from_numpy(rng.uniform(0.8, 1.25, (n, 1, 1, 1)).astype(np.float32))
    contrast = torch.from_numpy(rng.uniform(0.85, 1.1, (n, 1, 1, 1)).astype(np.float32))
    noise = torch.from_numpy(rng.normal(0, 0.02, (n, 1, size, size)).astype(np.float32))
    img = (img.clamp(0, 1) ** gamma * contrast + noise).clamp(0, 1)
    return img.expand(-1, 3, -1, -1).contiguous()


def _normal_images(category: str, split: str, n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    if category == "phantom":
        return _jittered(source_image("phantom")[:1][None], n, size, rng)
    if category == "brain":
        return _jittered(brain_slices(split), n, size, rng)
    return _crops(category, split, n, size, rng)


def _foreign_source(category: str, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A crop of a *different* texture, for the foreign-patch defect."""
    other = [t for t in TEXTURES if t != category][int(rng.integers(2))]
    return _crops(other, "test", 1, size, rng)[0]


@lru_cache(maxsize=32)
def _build(category: str, image_size: int, n_train: int, n_test: int, n_anomalous: int, seed: int):
    # Separate streams per split, so changing n_test never changes the training images.
    rng_train, rng_test, rng_defect = (np.random.default_rng([seed, MINI_CATEGORIES.index(category), k]) for k in range(3))
    train = _normal_images(category, "train", n_train, image_size, rng_train)
    test = _normal_images(category, "test", n_test + n_anomalous, image_size, rng_test)
    family = list(D.TEXTURE_DEFECTS if category in TEXTURES else D.MEDICAL_DEFECTS)
    kinds = [family[i % len(family)] for i in rng_defect.permutation(n_anomalous)]
    masks = torch.zeros(len(test), 1, image_size, image_size)
    for i, kind in enumerate(kinds):
        j = n_test + i
        region = None
        if category in ("phantom", "brain"):  # lesions sit inside the head
            region = (test[j, 0] > 0.15).numpy()
        source = _foreign_source(category, image_size, rng_defect) if kind == "foreign_patch" else None
        test[j], masks[j] = D.apply_defect(kind, test[j], rng_defect, region=region, source=source)
    labels = torch.cat([torch.zeros(n_test), torch.ones(n_anomalous)]).long()
    return train, test, labels, masks, ["good"] * n_test + kinds


def mini(category: str, split: str, *, image_size: int = 64, n_train: int = 200, n_test: int = 100,
         n_anomalous: int = 100, seed: int = 0) -> ArrayDataset:
    """One ``uadkit-mini`` category. ``n_test`` normal and ``n_anomalous`` defective test images."""
    if category not in MINI_CATEGORIES:
        raise UnknownDataset(f"unknown uadkit-mini category {category!r}; valid: {', '.join(MINI_CATEGORIES)}")
    if min(n_train, n_test, n_anomalous) < 0 or image_size < 8:
        raise ValueError("sizes must be non-negative and image_size ≥ 8")
    train, test, labels, masks, kinds = _build(category, image_size, n_train, n_test, n_anomalous, seed)
    name = f"mini/{category}"
    if split == "train":
        ds = ArrayDataset(train.clone(), torch.zeros(n_train, dtype=torch.long), None, category=name, name=name)
        ds.defects = ["good"] * n_train
    else:
        ds = ArrayDataset(test.clone(), labels, masks, category=name, name=name)
        ds.defects = list(kinds)
    return ds


@lru_cache(maxsize=4)
def _digits_split(seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = np.round(x[order].reshape(-1, 1, 8, 8) * 255 / 16).astype(np.uint8)
    y, cut = y[order], 2 * len(y) // 3
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def digits(k: int, split: str, *, image_size: int = 64, seed: int = 0) -> ArrayDataset:
    """One-vs-all on scikit-learn's digits (the CIFAR-10 protocol, in miniature).

    A fixed 2/3 : 1/3 split of the 1,797 images; train on class ``k``, test on the
    class-``k`` images of the other third plus as many from the other classes. No masks.
    """
    train, test = _digits_split(seed)
    return one_vs_all(train, test, k, split, image_size=image_size, name=f"digits/{k}", seed=seed)
