"""Small FAKE dataset trees in the published layouts, for the paper profile's dry run and for tests.

The book's paper profile reads real datasets from ``$UADKIT_DATA`` through the loaders of
:mod:`uadkit.data`. Offline (CI, a laptop) there are none, so :func:`build` writes a few tiny,
deterministic images per split in exactly the layout and file formats that ``python -m uadkit.fetch``
leaves on disk; the real loaders then read them unchanged (see :mod:`uadkit.dryrun`).
**Every image is synthetic** (smooth noise plus a pattern; each anomalous image has a visible
defect exactly where its mask is non-zero): nothing computed on these trees is a result.

>>> from uadkit.data import fake, get_dataset
>>> root = fake.build_all("/tmp/uadkit-fake")             # doctest: +SKIP
>>> get_dataset("mvtec/grid", "test", root=root)           # doctest: +SKIP

Layouts, one item each (under ``root``; "N/a+b": N train images, a normal + b anomalous test images):

* ``mvtec/<category>/{train/good,test/good,test/<defect>}/NNN.png`` + ``ground_truth/<defect>/NNN_mask.png`` (L,
  0/255): all 15 categories, two real defect names each (toothbrush: its one, "defective"), grid/screw/zipper "L",
  the rest RGB, 64 px; 5/2+3.
* ``visa/<object>/Data/Images/{Normal,Anomaly}/*.JPG`` (RGB, 64×48) + ``Data/Masks/Anomaly/NNN.png`` (L, values 1-2
  like the real masks' small indices) + ``image_anno.csv``, and ``visa/split_csv/1cls.csv``
  (``object,split,label,image,mask``): all 12 objects; 4/2+3.
* ``cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` and
  ``cifar100/cifar-100-python/{train,test,meta}``: pickled as Python 2 pickled the originals (byte-string keys: str
  with ``encoding="latin1"``, bytes with ``"bytes"``; ``data`` uint8 N×3072 via ``numpy.core.multiarray``); CIFAR-10
  5 train + 2 test images per class, CIFAR-100 2 + 2 per fine class (real names and super-class mapping).
* ``bmad/{Brain,Liver,RESC,Chest}/train/good/img/``, ``{valid,test}/{good,Ungood}/img/*.png`` (L) + ``.../label/``
  masks of the same name (0/255; none for Chest), Liver slices 256 px; ``bmad/Liver_roi/`` written by
  ``python -m uadkit.fetch bmad --liver-roi``'s code; 5/2+3 (valid 2+2).
* ``covidx/{train,test}/*.png|jpg`` (L) + ``{train,test}.txt`` (``<patient id> <file> <positive|negative>
  <source>``): train 6 negative + 2 positive (the loader keeps the negatives), test 2+2.
* ``hyper-kvasir/labeled/labeled-images/lower-gi-tract/``: ``anatomical-landmarks/{cecum,ileum}/<uuid>.jpg`` and
  ``quality-of-mucosal-views/bbps-2-3/`` (1,606 normal: the loader trains on 1,600; plus 2 in each of ``bbps-0-1``
  and ``pathological-findings/polyps``, which it must skip); ``hyper-kvasir/segmented/segmented-images/`` with
  ``{images,masks}/<id>.jpg`` (6 polyps, RGB JPEG masks as the real ones) + ``bounding-boxes.json``.
* ``cub200/CUB_200_2011/{images,image_class_labels,train_test_split,classes,bounding_boxes}.txt`` +
  ``images/NNN.<Class_name>/*.jpg``: the 200 real class names, 2 train + 2 test 32-px JPEGs each.

Trees that ``uadkit.fetch`` unpacks also get its ``.uadkit-complete`` marker. Each kind's folder
gets a ``.uadkit-fake`` marker (kind, seed, options): a second :func:`build` with the same arguments
returns at once, other arguments rebuild it, and a folder without the marker (a real dataset) is
never written into.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..fetch._core import MARKER as COMPLETE  # what uadkit.fetch writes into a tree it unpacked
from .base import UnknownDataset
from .folders import MVTEC_CATEGORIES, VISA_CATEGORIES

__all__ = ["build", "build_all", "KINDS", "MARKER"]

KINDS: tuple[str, ...] = ("mvtec", "visa", "cifar10", "cifar100", "bmad", "covidx", "hyper-kvasir", "cub200")
MARKER = ".uadkit-fake"
_FORMAT = 1  # bump when a layout changes: older fake trees are then rebuilt

# --------------------------------------------------------------------------- pictures


@lru_cache(maxsize=32)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (yy + 0.5) / h, (xx + 0.5) / w


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    """Smooth noise in about [0, 1], h×w: a random cells×cells field, bicubically upsampled."""
    lo = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    return np.asarray(lo.resize((w, h), Image.BICUBIC), np.float32)


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


_BLACK = {"brain", "liver", "colon"}  # medical pictures whose background is exactly 0 (a CT/MRI field of view)


def _picture(rng, h, w, style, fg, bg, *, noise=0.12):
    """One h×w×3 picture in [0, 1] of ``style``; also where a defect may go (the object, tissue, ...)."""
    yy, xx = _grid(h, w)
    cy, cx = 0.5 + rng.normal(0, 0.02, 2)  # objects roughly aligned, as in the benchmarks
    ph = rng.uniform(0, 2 * np.pi)
    region = None
    if style == "stripes":  # wood, carpet
        a = 0.5 + 0.5 * np.sin(2 * np.pi * 5 * (xx + 0.25 * yy + 0.3 * _smooth(rng, h, w, 3)) + ph)
    elif style == "weave":
        a = (0.5 + 0.25 * np.sin(2 * np.pi * 9 * xx + ph) + 0.25 * np.sin(2 * np.pi * 9 * yy + ph))
    elif style == "grid":
        a = ((xx * 7 % 1 < 0.22) | (yy * 7 % 1 < 0.22)).astype(np.float32)  # aligned, as in the real set
    elif style == "blotch":  # leather, tile
        a = _smooth(rng, h, w, 7)
    elif style == "disc":
        a = np.hypot(yy - cy, xx - cx) < 0.32
    elif style == "ellipse":
        a = _ellipse(yy, xx, cy, cx, 0.2, 0.4)
    elif style == "ring":
        r = np.hypot(yy - cy, xx - cx)
        a = (r > 0.14) & (r < 0.36)
    elif style == "bar":
        a = (np.abs(xx - cx) < 0.1) & (np.abs(yy - 0.5) < 0.42)
    elif style == "diagonal":  # a screw
        a = (np.abs((xx - cx) - (yy - cy)) < 0.1) & (np.abs(xx + yy - 1) < 0.7)
    elif style == "multi":  # several instances: candles, capsules, macaroni
        a = np.zeros((h, w), bool)
        for oy in (0.3, 0.7):
            for ox in (0.3, 0.7):
                a |= _ellipse(yy, xx, oy + rng.normal(0, 0.015), ox + rng.normal(0, 0.015), 0.14, 0.12)
    elif style == "chip":  # transistor, PCB
        a = (np.abs(xx - cx) < 0.25) & (np.abs(yy - cy + 0.1) < 0.18)
        a |= ((xx * 4 + 0.5) % 1 < 0.18) & (yy > cy + 0.05) & (yy < 0.85) & (np.abs(xx - cx) < 0.35)
    elif style == "zipper":
        a = (np.abs(xx - 0.5) < 0.06) | ((np.abs(xx - 0.5) < 0.18) & ((yy * 10 + ph) % 1 < 0.5))
    elif style == "bird":  # CUB: a body and a head on a leafy background
        a = _ellipse(yy, xx, cy + 0.05, cx, 0.2, 0.3) | (np.hypot(yy - cy + 0.2, xx - cx - 0.22) < 0.12)
    elif style == "brain":  # an axial MRI slice
        head = _ellipse(yy, xx, cy, cx, 0.42, 0.34)
        region = _ellipse(yy, xx, cy, cx, 0.34, 0.26)
        a = head * (0.5 + 0.5 * region)
    elif style == "liver":  # an abdominal CT slice: the body, the liver brighter on the left of the image
        body = _ellipse(yy, xx, cy, cx, 0.34, 0.44)
        region = _ellipse(yy, xx, cy - 0.04, cx - 0.16, 0.2, 0.2) & body
        a = body * (0.55 + 0.45 * region)
    elif style == "retina":  # an OCT B-scan: wavy bright layers
        top = 0.35 + 0.06 * np.sin(2 * np.pi * xx + ph)
        region = (yy > top) & (yy < top + 0.32)
        a = region * (0.6 + 0.4 * np.sin(2 * np.pi * 6 * (yy - top)) ** 2)
    elif style == "chest":  # a frontal X-ray: bright body, two dark lungs
        lungs = _ellipse(yy, xx, cy, cx - 0.2, 0.3, 0.15) | _ellipse(yy, xx, cy, cx + 0.2, 0.3, 0.15)
        region = lungs
        a = _ellipse(yy, xx, cy + 0.05, cx, 0.5, 0.45) * (1 - 0.7 * lungs)
    elif style == "colon":  # an endoscopy frame: mucosa, a dark lumen, black corners
        view = np.hypot(yy - 0.5, xx - 0.5) < 0.55
        lumen = np.hypot(yy - cy - rng.normal(0, 0.08), xx - cx - rng.normal(0, 0.08)) < 0.12
        region = view & ~lumen
        a = view * (1 - 0.8 * lumen)
    else:
        raise ValueError(f"unknown picture style {style!r}")
    a = np.asarray(a, np.float32)
    fg, bg = np.asarray(fg, np.float32), np.asarray(bg, np.float32)
    img = bg * (1 - a[..., None]) + fg * a[..., None] + noise * (_smooth(rng, h, w, 5)[..., None] - 0.5)
    if style in _BLACK:
        img = img * (a > 0)[..., None]
    if region is None:
        region = a > 0.5 if style in ("disc", "ellipse", "ring", "bar", "diagonal", "multi", "chip", "zipper",
                                      "bird") else np.ones((h, w), bool)
    if not region.any():
        region = np.ones((h, w), bool)
    return np.clip(img, 0, 1), region


_LINE_WORDS = ("scratch", "crack", "cut", "bent", "thread", "broken", "lead", "wire", "fold", "stroke", "split")


def _defect(rng, img, region, *, line=False, scale=1.0):
    """Paint one defect (a blob, or a scratch when ``line``) at a random place in ``region``.
    Returns the new picture and the defect's mask (bool), exactly the pixels that changed."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inner = np.zeros_like(region)
    inner[int(0.15 * h):h - int(0.15 * h), int(0.15 * w):w - int(0.15 * w)] = True  # not cut by the border
    ys, xs = np.nonzero(region & inner) if (region & inner).any() else np.nonzero(region)
    k = rng.integers(len(ys))
    cy, cx = ys[k] + 0.5, xs[k] + 0.5
    if line:
        t = rng.uniform(0, np.pi)
        half = rng.uniform(0.15, 0.25) * min(h, w) * scale
        dy, dx = np.sin(t), np.cos(t)
        along = np.clip((yy - cy) * dy + (xx - cx) * dx, -half, half)
        dist = np.hypot(yy - (cy + along * dy), xx - (cx + along * dx))
        mask = dist <= max(1.6, 0.04 * min(h, w) * scale)
    else:
        ry, rx = rng.uniform(0.08, 0.15, 2) * np.array([h, w]) * scale
        mask = _ellipse(yy, xx, cy, cx, max(ry, 2.5), max(rx, 2.5))
    under = img[mask].mean(-1)
    tone = 0.08 if np.abs(under - 0.08).mean() >= np.abs(under - 0.95).mean() else 0.95  # the stronger contrast
    colour = np.array([tone, tone, tone], np.float32)
    colour[0] = min(1.0, tone + 0.25)  # a reddish tint: visible in RGB, harmless in grey
    out = img.copy()
    out[mask] = 0.1 * img[mask] + 0.9 * colour
    return out, mask


def _u8(img: np.ndarray, grey: bool = False) -> np.ndarray:
    a = img.mean(-1) if grey and img.ndim == 3 else img
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _save(path: Path, img: np.ndarray, *, grey: bool = False) -> None:
    """PNG or JPEG by suffix; RGB, or grey (mode "L") when ``grey``."""
    opts = {"quality": 90} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(_u8(img, grey)).save(path, **opts)


def _save_mask(path: Path, mask: np.ndarray, *, value: int = 255, rgb: bool = False) -> None:
    m = mask.astype(np.uint8) * value
    Image.fromarray(np.repeat(m[..., None], 3, -1) if rgb else m).save(path, **(
        {"quality": 90} if path.suffix.lower() in (".jpg", ".jpeg") else {}))


def _rng(seed: int, kind: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, KINDS.index(kind), *more])


def _uuid(rng) -> str:
    h = rng.bytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _mkdirs(*dirs: Path) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- MVTec AD

_MVTEC = {  # category: (style, foreground, background, two real defect names)
    "bottle": ("disc", (0.2, 0.35, 0.15), (0.05, 0.05, 0.05), ("broken_large", "contamination")),
    "cable": ("multi", (0.2, 0.5, 0.2), (0.85, 0.85, 0.8), ("bent_wire", "missing_cable")),
    "capsule": ("ellipse", (0.9, 0.85, 0.8), (0.3, 0.3, 0.3), ("crack", "squeeze")),
    "carpet": ("weave", (0.45, 0.35, 0.3), (0.25, 0.2, 0.18), ("color", "hole")),
    "grid": ("grid", (0.75, 0.75, 0.75), (0.25, 0.25, 0.25), ("bent", "broken")),
    "hazelnut": ("disc", (0.55, 0.35, 0.2), (0.02, 0.02, 0.02), ("crack", "print")),
    "leather": ("blotch", (0.55, 0.3, 0.2), (0.4, 0.22, 0.15), ("cut", "glue")),
    "metal_nut": ("ring", (0.6, 0.6, 0.65), (0.1, 0.1, 0.1), ("bent", "scratch")),
    "pill": ("ellipse", (0.9, 0.9, 0.88), (0.15, 0.15, 0.15), ("color", "crack")),
    "screw": ("diagonal", (0.35, 0.35, 0.35), (0.85, 0.85, 0.85), ("scratch_head", "thread_side")),
    "tile": ("blotch", (0.75, 0.75, 0.7), (0.55, 0.55, 0.5), ("crack", "oil")),
    "toothbrush": ("bar", (0.2, 0.4, 0.85), (0.9, 0.9, 0.9), ("defective",)),  # the real set has one type
    "transistor": ("chip", (0.15, 0.15, 0.15), (0.8, 0.75, 0.6), ("bent_lead", "damaged_case")),
    "wood": ("stripes", (0.6, 0.42, 0.25), (0.45, 0.3, 0.18), ("hole", "scratch")),
    "zipper": ("zipper", (0.2, 0.2, 0.2), (0.6, 0.6, 0.6), ("broken_teeth", "rough")),
}
_MVTEC_GREY = ("grid", "screw", "zipper")  # greyscale PNGs in the real set


def _mvtec(out: Path, seed: int, *, size: int = 64, categories=MVTEC_CATEGORIES) -> None:
    for cat in categories:
        if cat not in _MVTEC:
            raise UnknownDataset(f"unknown MVTec AD category {cat!r}; valid: {', '.join(MVTEC_CATEGORIES)}")
        style, fg, bg, defects = _MVTEC[cat]
        grey = cat in _MVTEC_GREY
        rng = _rng(seed, "mvtec", MVTEC_CATEGORIES.index(cat))
        base = out / cat
        for split, n in (("train", 5), ("test", 2)):
            _mkdirs(base / split / "good")
            for i in range(n):
                _save(base / split / "good" / f"{i:03d}.png", _picture(rng, size, size, style, fg, bg)[0], grey=grey)
        counts = (2, 1) if len(defects) == 2 else (3,)
        for defect, n in zip(defects, counts):
            _mkdirs(base / "test" / defect, base / "ground_truth" / defect)
            for i in range(n):
                img, region = _picture(rng, size, size, style, fg, bg)
                img, mask = _defect(rng, img, region, line=any(w in defect for w in _LINE_WORDS))
                _save(base / "test" / defect / f"{i:03d}.png", img, grey=grey)
                _save_mask(base / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    (out / "readme.txt").write_text("FAKE MVTec AD tree written by uadkit.data.fake: synthetic, never a result.\n")
    (out / COMPLETE).write_text("mvtec_anomaly_detection.tar.xz")


# --------------------------------------------------------------------------- VisA

_VISA = {  # object: (style, foreground, background)
    "candle": ("multi", (0.92, 0.9, 0.85), (0.1, 0.1, 0.1)),
    "capsules": ("multi", (0.3, 0.6, 0.3), (0.85, 0.85, 0.85)),
    "cashew": ("ellipse", (0.85, 0.7, 0.45), (0.2, 0.2, 0.2)),
    "chewinggum": ("ellipse", (0.95, 0.95, 0.95), (0.3, 0.25, 0.2)),
    "fryum": ("ring", (0.9, 0.75, 0.4), (0.35, 0.55, 0.3)),
    "macaroni1": ("multi", (0.95, 0.85, 0.55), (0.45, 0.3, 0.2)),
    "macaroni2": ("multi", (0.95, 0.85, 0.55), (0.35, 0.35, 0.35)),
    "pcb1": ("chip", (0.1, 0.1, 0.1), (0.1, 0.45, 0.2)),
    "pcb2": ("chip", (0.15, 0.15, 0.15), (0.1, 0.4, 0.25)),
    "pcb3": ("chip", (0.2, 0.2, 0.2), (0.15, 0.45, 0.2)),
    "pcb4": ("chip", (0.1, 0.1, 0.1), (0.15, 0.2, 0.55)),
    "pipe_fryum": ("ellipse", (0.9, 0.75, 0.45), (0.25, 0.25, 0.3)),
}


def _visa(out: Path, seed: int, *, size: int = 64, categories=VISA_CATEGORIES) -> None:
    h = size * 3 // 4  # VisA images are wider than high
    rows = []
    for obj in categories:
        if obj not in _VISA:
            raise UnknownDataset(f"unknown VisA object {obj!r}; valid: {', '.join(VISA_CATEGORIES)}")
        style, fg, bg = _VISA[obj]
        rng = _rng(seed, "visa", VISA_CATEGORIES.index(obj))
        normal, anomaly, masks = (out / obj / "Data" / p for p in ("Images/Normal", "Images/Anomaly", "Masks/Anomaly"))
        _mkdirs(normal, anomaly, masks)
        anno = []
        for i in range(6):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _save(out / rel, _picture(rng, h, size, style, fg, bg)[0])
            rows.append((obj, "train" if i < 4 else "test", "normal", rel, ""))
            anno.append((rel, "normal", ""))
        for i in range(3):
            rel, mrel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            img, region = _picture(rng, h, size, style, fg, bg)
            img, mask = _defect(rng, img, region, line=i % 2 == 1)
            _save(out / rel, img)
            _save_mask(out / mrel, mask, value=1 + i % 2)  # the real masks hold small defect indices, not 255
            rows.append((obj, "test", "anomaly", rel, mrel))
            anno.append((rel, "scratch" if i % 2 else "spot", mrel))
        with open(out / obj / "image_anno.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([("image", "label", "mask"), *anno])
    _mkdirs(out / "split_csv")
    with open(out / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("object", "split", "label", "image", "mask"), *rows])
    (out / COMPLETE).write_text("VisA_20220922.tar")


# --------------------------------------------------------------------------- CIFAR


def _py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2's cPickle wrote the CIFAR batches (protocol 2): ``str`` as byte strings
    and uint8 arrays through ``numpy.core.multiarray._reconstruct``. So ``pickle.load(f, encoding="latin1")``
    gives str keys (what the loader and torchvision use) and ``encoding="bytes"`` gives b"data", as with
    the real files."""
    out = [b"\x80\x02"]

    def string(b: bytes):
        out.append(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)

    def integer(n: int):
        if 0 <= n < 256:
            out.append(b"K" + bytes([n]))
        elif 0 <= n < 65536:
            out.append(b"M" + struct.pack("<H", n))
        else:
            out.append(b"J" + struct.pack("<i", n))

    def save(x):
        if isinstance(x, dict):
            out.append(b"}(")
            for k, v in x.items():
                save(k)
                save(v)
            out.append(b"u")
        elif isinstance(x, list):
            out.append(b"](")
            for v in x:
                save(v)
            out.append(b"e")
        elif isinstance(x, str):
            string(x.encode("latin1"))
        elif isinstance(x, (int, np.integer)) and not isinstance(x, bool):
            integer(int(x))
        elif isinstance(x, np.ndarray) and x.dtype == np.uint8 and 1 <= x.ndim <= 3:
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01")
            for d in x.shape:
                integer(d)
            out.append(b"\x85\x86\x87"[x.ndim - 1:x.ndim])
            out.append(b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            out.append(b"\x89")  # not Fortran-ordered
            string(np.ascontiguousarray(x).tobytes())
            out.append(b"tb")
        else:
            raise TypeError(f"_py2_pickle: cannot write {type(x).__name__}")

    save(obj)
    out.append(b".")
    return b"".join(out)


_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_COARSE = {  # the real super-classes, in the real (alphabetical) order, with their fine classes
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
_CLASS_STYLES = ("disc", "ellipse", "ring", "bar", "diagonal", "multi", "chip", "stripes", "grid", "bird")


def _looks(seed: int, kind: str, n: int, group=None) -> list:
    """A fixed (style, foreground, background) per class; classes of one ``group`` (super-class) share a style."""
    out = []
    for c in range(n):
        r = _rng(seed, kind, 2000 + c)
        style = _CLASS_STYLES[(c if group is None else group[c]) % len(_CLASS_STYLES)]
        out.append((style, r.uniform(0.45, 1.0, 3), r.uniform(0.0, 0.45, 3)))
    return out


def _cifar_rows(rng, labels, looks) -> np.ndarray:
    """32×32 pictures, one per label, as CIFAR rows: 3072 uint8 (the R plane, then G, then B)."""
    rows = np.empty((len(labels), 3072), np.uint8)
    for n, c in enumerate(labels):
        style, fg, bg = looks[c]
        rows[n] = _u8(_picture(rng, 32, 32, style, fg, bg)[0]).transpose(2, 0, 1).reshape(-1)
    return rows


def _cifar10(out: Path, seed: int) -> None:
    folder = out / "cifar-10-batches-py"
    _mkdirs(folder)
    looks = _looks(seed, "cifar10", 10)
    files = [(f"data_batch_{i}", f"training batch {i} of 5", 1) for i in range(1, 6)]
    for n, (fname, batch_label, per_class) in enumerate(files + [("test_batch", "testing batch 1 of 1", 2)]):
        rng = _rng(seed, "cifar10", n)
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).tolist()
        batch = {"data": _cifar_rows(rng, labels, looks), "labels": labels, "batch_label": batch_label,
                 "filenames": [f"{_CIFAR10[c]}_s_{rng.integers(1, 10 ** 6):06d}.png" for c in labels]}
        (folder / fname).write_bytes(_py2_pickle(batch))
    meta = {"num_cases_per_batch": 10, "label_names": list(_CIFAR10), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta))
    (out / COMPLETE).write_text("cifar-10-python.tar.gz")


def _cifar100(out: Path, seed: int) -> None:
    folder = out / "cifar-100-python"
    _mkdirs(folder)
    coarse_names = list(_CIFAR100_COARSE)
    fine_of = {f: coarse_names.index(c) for c, fs in _CIFAR100_COARSE.items() for f in fs.split()}
    fine_names = sorted(fine_of)  # the real fine labels are alphabetical too
    coarse = [fine_of[f] for f in fine_names]
    looks = _looks(seed, "cifar100", 100, group=coarse)
    for n, (fname, batch_label) in enumerate((("train", "training batch 1 of 1"), ("test", "testing batch 1 of 1"))):
        rng = _rng(seed, "cifar100", n)
        fine = rng.permutation(np.repeat(np.arange(100), 2)).tolist()
        batch = {"filenames": [f"{fine_names[c]}_s_{rng.integers(1, 10 ** 6):06d}.png" for c in fine],
                 "batch_label": batch_label, "fine_labels": fine, "coarse_labels": [coarse[c] for c in fine],
                 "data": _cifar_rows(rng, fine, looks)}
        (folder / fname).write_bytes(_py2_pickle(batch))
    (folder / "meta").write_bytes(_py2_pickle({"fine_label_names": fine_names, "coarse_label_names": coarse_names}))
    (out / COMPLETE).write_text("cifar-100-python.tar.gz")


# --------------------------------------------------------------------------- BMAD

_BMAD = {  # folder: (style, foreground, background, has pixel masks, (height, width) in units of ``size``)
    "Brain": ("brain", (0.45, 0.45, 0.45), (0.0, 0.0, 0.0), True, (1, 1)),
    # larger CT slices, so that Liver_roi's crop is scaled down to 224 as with the real ones
    "Liver": ("liver", (0.6, 0.6, 0.6), (0.0, 0.0, 0.0), True, (4, 4)),
    "RESC": ("retina", (0.7, 0.7, 0.7), (0.12, 0.12, 0.12), True, (1, 1.5)),
    "Chest": ("chest", (0.85, 0.85, 0.85), (0.05, 0.05, 0.05), False, (1, 1)),
}


def _bmad(out: Path, seed: int, *, size: int = 64) -> None:
    for n, (folder, (style, fg, bg, masked, (fh, fw))) in enumerate(_BMAD.items()):
        rng = _rng(seed, "bmad", n)
        h, w = int(size * fh), int(size * fw)
        for split, n_good, n_bad in (("train", 5, 0), ("valid", 2, 2), ("test", 2, 3)):
            for group, count in (("good", n_good), ("Ungood", n_bad)):
                if not count:
                    continue
                img_dir, label_dir = (out / folder / split / group / p for p in ("img", "label"))
                _mkdirs(img_dir, *([label_dir] if masked and split != "train" else []))
                for i in range(count):
                    name = (_uuid(rng) if folder == "Chest" else f"{n * 100 + i:05d}_{rng.integers(20, 120)}") + ".png"
                    img, region = _picture(rng, h, w, style, fg, bg, noise=0.1)
                    mask = np.zeros((h, w), bool)
                    if group == "Ungood":
                        img, mask = _defect(rng, img, region, scale=0.8)
                    _save(img_dir / name, img, grey=True)
                    if masked and split != "train":
                        _save_mask(label_dir / name, mask)
    _liver_roi(out.parent)


def _liver_roi(root: Path) -> None:
    """``bmad/Liver_roi`` from ``bmad/Liver``, by the code of ``python -m uadkit.fetch bmad --liver-roi``."""
    from ..fetch.bmad import liver_roi

    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        liver_roi(root, force=True)


# --------------------------------------------------------------------------- Covid-X

_COVIDX_SOURCES = ("rsna", "cohen", "actmed", "sirm", "ricord", "bimcv", "stonybrook")


def _covidx(out: Path, seed: int, *, size: int = 64) -> None:
    rng = _rng(seed, "covidx", 0)
    fg, bg = (0.85, 0.85, 0.85), (0.05, 0.05, 0.05)
    for split, counts in (("train", (("negative", 6), ("positive", 2))), ("test", (("negative", 2), ("positive", 2)))):
        _mkdirs(out / split)
        lines = []
        for cls, count in counts:
            for _ in range(count):
                source = _COVIDX_SOURCES[rng.integers(len(_COVIDX_SOURCES))]
                patient = str(rng.integers(1, 99999))
                name = f"{_uuid(rng)}.png" if source == "rsna" else f"{source}-{patient}-{rng.integers(1000):03d}.jpg"
                img, region = _picture(rng, size, size, "chest", fg, bg, noise=0.1)
                if cls == "positive":  # an opacity in a lung; Covid-X has image labels only, no masks
                    img, _ = _defect(rng, img, region, scale=1.3)
                _save(out / split / name, img, grey=True)
                lines.append(f"{patient} {name} {cls} {source}")
        order = rng.permutation(len(lines))
        (out / f"{split}.txt").write_text("".join(lines[i] + "\n" for i in order))


# --------------------------------------------------------------------------- Hyper-Kvasir

_KVASIR_NORMAL_DIRS = ("lower-gi-tract/anatomical-landmarks/cecum", "lower-gi-tract/anatomical-landmarks/ileum",
                       "lower-gi-tract/quality-of-mucosal-views/bbps-2-3")
_KVASIR_OTHER_DIRS = ("lower-gi-tract/quality-of-mucosal-views/bbps-0-1",  # not normal: the loader must skip these
                      "lower-gi-tract/pathological-findings/polyps")


def _hyper_kvasir(out: Path, seed: int, *, n_normal: int = 1606, n_polyps: int = 6, size: int = 40) -> None:
    """``n_normal`` normal images (the loader trains on ``n_train=1600`` of them and tests on the rest) over
    cecum, ileum and bbps-2-3 in about the real proportions (1,009 : 9 : 1,148), ``n_polyps`` segmented polyps
    with masks, and 2 images in each of two folders that are not normal."""
    rng = _rng(seed, "hyper-kvasir", 0)
    ileum = min(9, n_normal // 3)
    cecum = round((n_normal - ileum) * 1009 / 2157)
    counts = dict(zip(_KVASIR_NORMAL_DIRS, (cecum, ileum, n_normal - ileum - cecum)))
    counts.update(dict.fromkeys(_KVASIR_OTHER_DIRS, 2))
    mucosa, lumen = (0.85, 0.45, 0.4), (0.25, 0.08, 0.06)
    h, w = size * 4 // 5, size
    for folder, count in counts.items():
        d = out / "labeled" / "labeled-images" / folder
        _mkdirs(d)
        for _ in range(count):
            img, region = _picture(rng, h, w, "colon", mucosa, lumen, noise=0.15)
            if folder.endswith("polyps"):
                img, _ = _defect(rng, img, region, scale=1.5)
            _save(d / f"{_uuid(rng)}.jpg", img)
    seg = out / "segmented" / "segmented-images"
    _mkdirs(seg / "images", seg / "masks")
    boxes = {}
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    sh, sw = size * 7 // 5, size * 8 // 5  # the polyp images are larger, as in the real set
    for _ in range(n_polyps):
        name = "cj" + "".join(rng.choice(alphabet, 23))
        img, region = _picture(rng, sh, sw, "colon", mucosa, lumen, noise=0.15)
        img, mask = _defect(rng, img, region, scale=1.8)
        _save(seg / "images" / f"{name}.jpg", img)
        _save_mask(seg / "masks" / f"{name}.jpg", mask, rgb=True)  # JPEG masks, RGB, as the real ones
        ys, xs = np.nonzero(mask)
        boxes[name] = {"height": sh, "width": sw, "bbox": [{"label": "polyp", "xmin": int(xs.min()),
                                                            "ymin": int(ys.min()), "xmax": int(xs.max()),
                                                            "ymax": int(ys.max())}]}
    (seg / "bounding-boxes.json").write_text(json.dumps(boxes, indent=1))
    for part, archive in (("labeled", "hyper-kvasir-labeled-images.zip"),
                          ("segmented", "hyper-kvasir-segmented-images.zip")):
        (out / part / COMPLETE).write_text(archive)


# --------------------------------------------------------------------------- CUB-200-2011

_CUB_NAMES = """
Black_footed_Albatross Laysan_Albatross Sooty_Albatross Groove_billed_Ani Crested_Auklet Least_Auklet
Parakeet_Auklet Rhinoceros_Auklet Brewer_Blackbird Red_winged_Blackbird Rusty_Blackbird Yellow_headed_Blackbird
Bobolink Indigo_Bunting Lazuli_Bunting Painted_Bunting Cardinal Spotted_Catbird Gray_Catbird
Yellow_breasted_Chat Eastern_Towhee Chuck_will_Widow Brandt_Cormorant Red_faced_Cormorant Pelagic_Cormorant
Bronzed_Cowbird Shiny_Cowbird Brown_Creeper American_Crow Fish_Crow Black_billed_Cuckoo Mangrove_Cuckoo
Yellow_billed_Cuckoo Gray_crowned_Rosy_Finch Purple_Finch Northern_Flicker Acadian_Flycatcher
Great_Crested_Flycatcher Least_Flycatcher Olive_sided_Flycatcher Scissor_tailed_Flycatcher Vermilion_Flycatcher
Yellow_bellied_Flycatcher Frigatebird Northern_Fulmar Gadwall American_Goldfinch European_Goldfinch
Boat_tailed_Grackle Eared_Grebe Horned_Grebe Pied_billed_Grebe Western_Grebe Blue_Grosbeak Evening_Grosbeak
Pine_Grosbeak Rose_breasted_Grosbeak Pigeon_Guillemot California_Gull Glaucous_winged_Gull Heermann_Gull
Herring_Gull Ivory_Gull Ring_billed_Gull Slaty_backed_Gull Western_Gull Anna_Hummingbird
Ruby_throated_Hummingbird Rufous_Hummingbird Green_Violetear Long_tailed_Jaeger Pomarine_Jaeger Blue_Jay
Florida_Jay Green_Jay Dark_eyed_Junco Tropical_Kingbird Gray_Kingbird Belted_Kingfisher Green_Kingfisher
Pied_Kingfisher Ringed_Kingfisher White_breasted_Kingfisher Red_legged_Kittiwake Horned_Lark Pacific_Loon
Mallard Western_Meadowlark Hooded_Merganser Red_breasted_Merganser Mockingbird Nighthawk Clark_Nutcracker
White_breasted_Nuthatch Baltimore_Oriole Hooded_Oriole Orchard_Oriole Scott_Oriole Ovenbird Brown_Pelican
White_Pelican Western_Wood_Pewee Sayornis American_Pipit Whip_poor_Will Horned_Puffin Common_Raven
White_necked_Raven American_Redstart Geococcyx Loggerhead_Shrike Great_Grey_Shrike Baird_Sparrow
Black_throated_Sparrow Brewer_Sparrow Chipping_Sparrow Clay_colored_Sparrow House_Sparrow Field_Sparrow
Fox_Sparrow Grasshopper_Sparrow Harris_Sparrow Henslow_Sparrow Le_Conte_Sparrow Lincoln_Sparrow
Nelson_Sharp_tailed_Sparrow Savannah_Sparrow Seaside_Sparrow Song_Sparrow Tree_Sparrow Vesper_Sparrow
White_crowned_Sparrow White_throated_Sparrow Cape_Glossy_Starling Bank_Swallow Barn_Swallow Cliff_Swallow
Tree_Swallow Scarlet_Tanager Summer_Tanager Artic_Tern Black_Tern Caspian_Tern Common_Tern Elegant_Tern
Forsters_Tern Least_Tern Green_tailed_Towhee Brown_Thrasher Sage_Thrasher Black_capped_Vireo Blue_headed_Vireo
Philadelphia_Vireo Red_eyed_Vireo Warbling_Vireo White_eyed_Vireo Yellow_throated_Vireo Bay_breasted_Warbler
Black_and_white_Warbler Black_throated_Blue_Warbler Blue_winged_Warbler Canada_Warbler Cape_May_Warbler
Cerulean_Warbler Chestnut_sided_Warbler Golden_winged_Warbler Hooded_Warbler Kentucky_Warbler Magnolia_Warbler
Mourning_Warbler Myrtle_Warbler Nashville_Warbler Orange_crowned_Warbler Palm_Warbler Pine_Warbler
Prairie_Warbler Prothonotary_Warbler Swainson_Warbler Tennessee_Warbler Wilson_Warbler Worm_eating_Warbler
Yellow_Warbler Northern_Waterthrush Louisiana_Waterthrush Bohemian_Waxwing Cedar_Waxwing
American_Three_toed_Woodpecker Pileated_Woodpecker Red_bellied_Woodpecker Red_cockaded_Woodpecker
Red_headed_Woodpecker Downy_Woodpecker Bewick_Wren Cactus_Wren Carolina_Wren House_Wren Marsh_Wren Rock_Wren
Winter_Wren Common_Yellowthroat
""".split()  # the 200 real class names in their real order (classes.txt), without the "NNN." prefix


def _cub(out: Path, seed: int, *, size: int = 32, n_train: int = 2, n_test: int = 2) -> None:
    assert len(_CUB_NAMES) == 200
    base = out / "CUB_200_2011"
    rng = _rng(seed, "cub200", 0)
    images, labels, split, boxes = [], [], [], []
    looks = _looks(seed, "cub200", 200)
    for c, name in enumerate(_CUB_NAMES):
        folder = f"{c + 1:03d}.{name}"
        _mkdirs(base / "images" / folder)
        _, fg, bg = looks[c]
        for j in range(n_train + n_test):
            img, region = _picture(rng, size, size, "bird", fg, bg * 0.6 + np.array([0.0, 0.3, 0.1]))
            fname = f"{folder}/{name}_{rng.integers(1, 10 ** 4):04d}_{rng.integers(1, 10 ** 6)}.jpg"
            _save(base / "images" / fname, img)
            i = len(images) + 1
            ys, xs = np.nonzero(region)
            images.append(f"{i} {fname}")
            labels.append(f"{i} {c + 1}")
            split.append(f"{i} {int(j < n_train)}")
            x0, y0 = xs.min(), ys.min()
            boxes.append(f"{i} {x0:.1f} {y0:.1f} {xs.max() - x0 + 1:.1f} {ys.max() - y0 + 1:.1f}")  # x y width height
    for fname, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split),
                         ("bounding_boxes.txt", boxes),
                         ("classes.txt", [f"{c + 1} {c + 1:03d}.{n}" for c, n in enumerate(_CUB_NAMES)])):
        (base / fname).write_text("".join(line + "\n" for line in lines))
    (out / COMPLETE).write_text("CUB_200_2011.tgz")


# --------------------------------------------------------------------------- the API

_BUILDERS = {"mvtec": _mvtec, "visa": _visa, "cifar10": _cifar10, "cifar100": _cifar100, "bmad": _bmad,
             "covidx": _covidx, "hyper-kvasir": _hyper_kvasir, "cub200": _cub}
assert tuple(_BUILDERS) == KINDS


def _meta(name: str, seed: int, kw: dict) -> dict:
    meta = {"kind": name, "seed": seed, "options": kw, "format": _FORMAT,
            "note": "FAKE data written by uadkit.data.fake (synthetic images): nothing computed on it is a result"}
    return json.loads(json.dumps(meta))  # tuples → lists, as read back


def _done(dest: Path, meta: dict) -> bool:
    try:
        return json.loads((dest / MARKER).read_text()) == meta
    except (OSError, ValueError):
        return False


def build(name: str, root: str | os.PathLike, *, seed: int = 0, **kw) -> Path:
    """Write the fake tree of dataset kind ``name`` (one of :data:`KINDS`) under ``root``; return ``root/name``.

    Deterministic in ``seed``. Keywords go to the kind's writer (e.g. ``size``, ``categories`` for
    mvtec/visa, ``n_normal`` for hyper-kvasir). A tree already built with the same arguments is kept as
    it is; one built with other arguments is replaced. A folder ``root/name`` that is not a fake tree
    (no ``.uadkit-fake`` marker), such as a real dataset, is never touched: that raises FileExistsError.
    The tree is written beside its place and renamed into it, so a failure leaves nothing half-written.
    """
    if name not in _BUILDERS:
        raise UnknownDataset(f"no fake tree for {name!r}; kinds: {', '.join(KINDS)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = Path(root).expanduser()
    dest = root / name
    meta = _meta(name, int(seed), kw)
    if _done(dest, meta):
        return dest
    if dest.exists() and not (dest / MARKER).is_file() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not a fake tree (no {MARKER} in it); refusing to write there")
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".building"))
    try:
        _BUILDERS[name](work / name, int(seed), **kw)
        (work / name / MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if _done(dest, meta):  # another process has built the same tree meanwhile: keep that one
            return dest
        if dest.exists():  # an older fake tree (other seed, options or format) or an empty folder
            shutil.rmtree(dest)
        try:
            os.replace(work / name, dest)
        except OSError:
            if not _done(dest, meta):  # else another process has just built the same tree
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def build_all(root: str | os.PathLike, *, seed: int = 0) -> Path:
    """Every kind of :data:`KINDS` under ``root`` (kept where already built with this seed); returns ``root``."""
    root = Path(root).expanduser()
    for name in KINDS:
        build(name, root, seed=seed)
    return root
