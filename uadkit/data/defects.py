"""Test-time defects of ``uadkit-mini``, each with an exact pixel mask.

These generators are *held out*: no training-time synthesis in
:mod:`uadkit.synth` (confetti noise, Perlin-blended textures, CutPaste) draws
the same shapes. A method that learns from synthetic anomalies therefore meets
defects it has never seen, as on MVTec AD; if the two were the same generator,
such methods would look better than they are.

Every function takes one image ``3×S×S`` float in [0, 1] and a
``numpy.random.Generator`` and returns ``(image, mask)`` with ``mask`` ``1×S×S``
in {0, 1}. Sizes are fractions of ``S``, so a defect looks the same at 64 px and
at 256 px. ``region`` (``S×S`` bool), when given, is where the defect's centre
may fall (inside the head of a phantom, say).

Families:
  textures (brick, grass, gravel): ``scratch``, ``stain``, ``hole``,
  ``foreign_patch``, ``warp``;
  medical (retina, histology, phantom, brain): ``bright_spots`` (exudate-like),
  ``dark_blob`` (haemorrhage-like), ``lesion`` (an ellipse of changed intensity).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TEXTURE_DEFECTS", "MEDICAL_DEFECTS", "apply_defect"]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``y, x``, each S×S, in pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _centre(size: int, rng: np.random.Generator, region: np.ndarray | None, margin: float) -> tuple[float, float]:
    """A random point at least ``margin``·S from the border (and inside ``region`` if given)."""
    lo, hi = margin * size, (1 - margin) * size
    if region is not None:
        ys, xs = np.nonzero(region[int(lo):int(hi), int(lo):int(hi)])
        if len(ys):
            k = rng.integers(len(ys))
            return float(ys[k] + int(lo)), float(xs[k] + int(lo))
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _blob(size: int, rng: np.random.Generator, *, radius: tuple[float, float], region=None, wobble=0.25) -> np.ndarray:
    """An irregular filled blob: an ellipse whose radius wobbles with the angle (S×S bool)."""
    yy, xx = _grid(size)
    cy, cx = _centre(size, rng, region, margin=0.2)
    ry, rx = rng.uniform(*radius, size=2) * size
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v, u)
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    bound = 1.0
    for k in (2, 3, 5):
        bound = bound + wobble / k * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    mask = r <= bound
    if not mask.any():  # tiny images: keep at least the centre pixel
        mask[int(cy), int(cx)] = True
    return mask


def _paint(image: torch.Tensor, mask: np.ndarray, value: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend ``value`` (3×S×S or 3×1×1) into ``image`` where ``mask`` is set."""
    m = torch.from_numpy(mask.astype(np.float32))[None]
    out = image * (1 - alpha * m) + alpha * m * value
    return out.clamp(0, 1), m


def _local_mean(image: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(mask)
    return image[:, m].mean(dim=1)[:, None, None]


# --------------------------------------------------------------------------- textures

def scratch(image, rng, region=None):
    """A thin curved line, darker or brighter than what it crosses."""
    size = image.shape[-1]
    p0 = np.array(_centre(size, rng, None, 0.1))
    p2 = np.array(_centre(size, rng, None, 0.1))
    while np.linalg.norm(p2 - p0) < 0.35 * size:
        p2 = np.array(_centre(size, rng, None, 0.1))
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.15 * size, 2)
    t = np.linspace(0, 1, 4 * size)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # quadratic Bézier, K×2
    yy, xx = _grid(size)
    d2 = (yy[..., None] - curve[:, 0]) ** 2 + (xx[..., None] - curve[:, 1]) ** 2
    width = max(1.0, rng.uniform(0.015, 0.03) * size)
    mask = np.sqrt(d2.min(-1)) <= width / 2
    shade = 0.08 if rng.random() < 0.5 else 0.92
    return _paint(image, mask, torch.full((3, 1, 1), shade), alpha=0.85)


def stain(image, rng, region=None):
    """A smooth irregular blot that tints and darkens the surface."""
    size = image.shape[-1]
    mask = _blob(size, rng, radius=(0.07, 0.16), region=region)
    tint = rng.uniform(0.45, 0.75) * (1 + rng.uniform(-0.12, 0.12, 3))  # darker, slightly coloured
    tint = torch.tensor(tint, dtype=torch.float32)[:, None, None]
    return _paint(image, mask, image * tint, alpha=1.0)


def hole(image, rng, region=None):
    """A dark round hole with a faint bright rim, the rim part of the defect."""
    size = image.shape[-1]
    yy, xx = _grid(size)
    cy, cx = _centre(size, rng, region, 0.2)
    r = rng.uniform(0.05, 0.1) * size
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    inner, rim = d <= r, (d > r) & (d <= r + max(1.0, 0.02 * size))
    out, m_in = _paint(image, inner, torch.full((3, 1, 1), 0.03), alpha=0.95)
    out, m_rim = _paint(out, rim, torch.full((3, 1, 1), 0.85), alpha=0.6)
    return out, torch.maximum(m_in, m_rim)


def foreign_patch(image, rng, region=None, *, source: torch.Tensor | None = None):
    """An irregular patch of another material (a crop of ``source``, a different image)."""
    size = image.shape[-1]
    if source is None:
        source = torch.rand(3, size, size, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
    mask = _blob(size, rng, radius=(0.1, 0.18), region=region)
    return _paint(image, mask, source, alpha=1.0)


def warp(image, rng, region=None):
    """A local swirl: the surface is twisted inside a disc. Mask = pixels moved by ≥ 1 px."""
    size = image.shape[-1]
    yy, xx = _grid(size)
    cy, cx = _centre(size, rng, region, 0.25)
    radius = rng.uniform(0.12, 0.2) * size
    strength = rng.choice([-1, 1]) * rng.uniform(1.5, 3.0)
    dy, dx = yy - cy, xx - cx
    d = np.sqrt(dy ** 2 + dx ** 2)
    angle = strength * np.clip(1 - d / radius, 0, None) ** 2
    sy = cy + dx * np.sin(angle) + dy * np.cos(angle)
    sx = cx + dx * np.cos(angle) - dy * np.sin(angle)
    moved = np.sqrt((sy - yy) ** 2 + (sx - xx) ** 2) >= 1.0
    grid = torch.from_numpy(np.stack([sx, sy], -1) / (size - 1) * 2 - 1)[None].float()  # 1×S×S×2, (x, y)
    warped = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    m = torch.from_numpy(moved.astype(np.float32))[None]
    return warped * m + image * (1 - m), m


# --------------------------------------------------------------------------- medical

def bright_spots(image, rng, region=None):
    """A cluster of small bright yellowish spots, like hard exudates in a fundus."""
    size = image.shape[-1]
    yy, xx = _grid(size)
    cy, cx = _centre(size, rng, region, 0.2)
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(3, 8)):
        sy, sx = cy + rng.normal(0, 0.06 * size), cx + rng.normal(0, 0.06 * size)
        r = rng.uniform(0.015, 0.04) * size
        mask |= (yy - sy) ** 2 + (xx - sx) ** 2 <= max(r, 0.75) ** 2
    colour = torch.tensor([1.0, 0.92, 0.55])[:, None, None]
    if image[0].allclose(image[1]) and image[1].allclose(image[2]):  # grey image: plain bright
        colour = torch.ones(3, 1, 1)
    return _paint(image, mask, colour, alpha=0.85)


def dark_blob(image, rng, region=None):
    """A dark irregular blot, like a haemorrhage (dark red on colour images)."""
    size = image.shape[-1]
    mask = _blob(size, rng, radius=(0.05, 0.12), region=region, wobble=0.35)
    colour = torch.tensor([0.35, 0.04, 0.04])[:, None, None]
    if image[0].allclose(image[1]) and image[1].allclose(image[2]):
        colour = _local_mean(image, mask) * 0.35
    return _paint(image, mask, colour, alpha=0.8)


def lesion(image, rng, region=None):
    """An ellipse of shifted, slightly textured intensity (a tumour-like lesion)."""
    size = image.shape[-1]
    mask = _blob(size, rng, radius=(0.06, 0.13), region=region, wobble=0.1)
    shift = rng.choice([-1, 1]) * rng.uniform(0.25, 0.4)
    noise = torch.from_numpy(rng.normal(0, 0.04, (1, size, size)).astype(np.float32))
    value = (_local_mean(image, mask) + shift + noise).clamp(0, 1)
    return _paint(image, mask, value, alpha=0.9)


TEXTURE_DEFECTS = {"scratch": scratch, "stain": stain, "hole": hole, "foreign_patch": foreign_patch, "warp": warp}
MEDICAL_DEFECTS = {"bright_spots": bright_spots, "dark_blob": dark_blob, "lesion": lesion}


def apply_defect(kind: str, image: torch.Tensor, rng: np.random.Generator, *, region=None, source=None):
    """Apply the defect ``kind`` to ``image`` (3×S×S); returns ``(image, mask)``."""
    table = {**TEXTURE_DEFECTS, **MEDICAL_DEFECTS}
    if kind not in table:
        raise ValueError(f"unknown defect {kind!r}; known: {', '.join(table)}")
    if kind == "foreign_patch":
        return foreign_patch(image, rng, region, source=source)
    return table[kind](image, rng, region)
