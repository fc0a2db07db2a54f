"""Training-time anomaly synthesis: confetti noise, Perlin-blended textures, CutPaste.

Methods that learn from anomalies without real ones (ADTR+, DRAEM, MDD-Net) make
them. Each function takes one image ``3×H×W`` in [0, 1] and a ``torch.Generator``
and returns ``(image, mask)``, mask ``1×H×W`` in {0, 1}.

These are deliberately *not* the test-time defects of ``uadkit-mini``
(:mod:`uadkit.data.defects`): evaluating on the generator a method trained on
would flatter it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["confetti_noise", "perlin_noise_2d", "perlin_anomaly", "cutpaste", "synthesize_batch"]


def _uniform(g: torch.Generator, lo: float, hi: float, n: int | None = None):
    x = torch.rand(n or 1, generator=g) * (hi - lo) + lo
    return x if n else float(x)


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi)."""
    return int(torch.randint(lo, max(hi, lo + 1), (1,), generator=g))


def confetti_noise(image: torch.Tensor, *, generator: torch.Generator, n_blobs: tuple[int, int] = (2, 8),
                   size_range: tuple[float, float] = (0.03, 0.12)) -> tuple[torch.Tensor, torch.Tensor]:
    """Confetti noise (FCDD, used by ADTR+): small rectangles of random colour added on the image.

    Blob sides are fractions of the image side; mask = the blobs.
    """
    _, h, w = image.shape
    out, mask = image.clone(), torch.zeros(1, h, w)
    for _ in range(_randint(generator, n_blobs[0], n_blobs[1] + 1)):
        bh = max(1, round(_uniform(generator, *size_range) * h))
        bw = max(1, round(_uniform(generator, *size_range) * w))
        y, x = _randint(generator, 0, h - bh + 1), _randint(generator, 0, w - bw + 1)
        colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1  # added, so it can darken or brighten
        out[:, y:y + bh, x:x + bw] = (out[:, y:y + bh, x:x + bw] + colour).clamp(0, 1)
        mask[:, y:y + bh, x:x + bw] = 1
    return out, mask


def perlin_noise_2d(shape: tuple[int, int], res: tuple[int, int], *, generator: torch.Generator) -> torch.Tensor:
    """Classic gradient (Perlin) noise on an ``res`` lattice, H×W in about [-1, 1]; H, W multiples of res."""
    h, w = shape
    d = (h // res[0], w // res[1])
    angles = 2 * math.pi * torch.rand(res[0] + 1, res[1] + 1, generator=generator)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    yy, xx = torch.meshgrid(torch.arange(h) / d[0], torch.arange(w) / d[1], indexing="ij")
    y0, x0 = yy.long().clamp(max=res[0] - 1), xx.long().clamp(max=res[1] - 1)
    fy, fx = yy - y0, xx - x0

    def corner(dy, dx):
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3  # noqa: E731
    top = torch.lerp(corner(0, 0), corner(0, 1), fade(fx))
    bottom = torch.lerp(corner(1, 0), corner(1, 1), fade(fx))
    return math.sqrt(2) * torch.lerp(top, bottom, fade(fy))


def perlin_anomaly(image: torch.Tensor, source: torch.Tensor | None = None, *, generator: torch.Generator,
                   threshold: float = 0.5, beta_range: tuple[float, float] = (0.1, 1.0)):
    """DRAEM-style: a thresholded Perlin-noise mask m, a foreign texture S blended in:
    I' = (1 − m)·I + (1 − β)·m·S + β·m·I. Without ``source``, S is the image itself with
    its tiles shuffled and its colours jittered (DRAEM uses DTD textures)."""
    _, h, w = image.shape
    scale = 2 ** _randint(generator, 0, 4)
    side = max(1, min(h, w) // 32)
    res = (max(1, min(scale, h // side)), max(1, min(scale, w // side)))
    hp, wp = math.ceil(h / res[0]) * res[0], math.ceil(w / res[1]) * res[1]
    noise = perlin_noise_2d((hp, wp), res, generator=generator)[:h, :w]
    if _randint(generator, 0, 2):
        noise = noise.flip(-1)
    if _randint(generator, 0, 2):
        noise = noise.transpose(0, 1)[:h, :w] if h == w else noise
    mask = (noise > threshold).float()[None]
    if mask.sum() == 0:  # keep every sample anomalous: lower the threshold to the noise's top decile
        mask = (noise >= noise.flatten().quantile(0.9)).float()[None]
    if source is None:
        source = _shuffled_tiles(image, generator)
    beta = _uniform(generator, *beta_range)
    out = (1 - mask) * image + (1 - beta) * mask * source + beta * mask * image
    return out.clamp(0, 1), mask


def _shuffled_tiles(image: torch.Tensor, g: torch.Generator, tiles: int = 4) -> torch.Tensor:
    """The image cut in tiles×tiles, shuffled, colour-jittered: a foreign texture made from itself."""
    c, h, w = image.shape
    th, tw = h // tiles, w // tiles
    crop = image[:, :th * tiles, :tw * tiles]
    blocks = crop.unfold(1, th, th).unfold(2, tw, tw).reshape(c, tiles * tiles, th, tw)
    blocks = blocks[:, torch.randperm(tiles * tiles, generator=g)]
    out = blocks.reshape(c, tiles, tiles, th, tw).permute(0, 1, 3, 2, 4).reshape(c, th * tiles, tw * tiles)
    out = F.interpolate(out[None], size=(h, w), mode="nearest")[0]
    gain = torch.rand(3, 1, 1, generator=g) * 0.8 + 0.6
    return (out * gain).clamp(0, 1)


def cutpaste(image: torch.Tensor, *, generator: torch.Generator, area_ratio=(0.02, 0.15), aspect_ratio=(0.3, 3.3),
             scar: bool = False):
    """CutPaste (Li et al., 2021): cut a rectangle, jitter its colour, paste it elsewhere.
    ``scar=True``: a thin long rectangle (the "scar" variant). Mask = the pasted area."""
    _, h, w = image.shape
    if scar:
        ph, pw = _randint(generator, max(2, h // 6), max(3, h // 3)), max(1, w // 32 + _randint(generator, 0, 2))
    else:
        area = _uniform(generator, *area_ratio) * h * w
        ratio = math.exp(_uniform(generator, math.log(aspect_ratio[0]), math.log(aspect_ratio[1])))
        ph = min(h - 1, max(1, round(math.sqrt(area * ratio))))
        pw = min(w - 1, max(1, round(math.sqrt(area / ratio))))
    sy, sx = _randint(generator, 0, h - ph + 1), _randint(generator, 0, w - pw + 1)
    ty, tx = _randint(generator, 0, h - ph + 1), _randint(generator, 0, w - pw + 1)
    patch = image[:, sy:sy + ph, sx:sx + pw] * (torch.rand(3, 1, 1, generator=generator) * 0.4 + 0.8)
    out, mask = image.clone(), torch.zeros(1, h, w)
    out[:, ty:ty + ph, tx:tx + pw] = patch.clamp(0, 1)
    mask[:, ty:ty + ph, tx:tx + pw] = 1
    return out, mask


_KINDS = {"confetti": confetti_noise, "perlin": perlin_anomaly, "cutpaste": cutpaste}


def synthesize_batch(images: torch.Tensor, kind: str, *, generator: torch.Generator, p: float = 0.5):
    """Make a random fraction ``p`` of a batch B×3×H×W anomalous with ``kind``
    ("confetti", "perlin", "cutpaste"). Returns images, masks B×1×H×W and labels B."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    images = images.clone()
    masks = torch.zeros(images.shape[0], 1, *images.shape[-2:])
    labels = (torch.rand(images.shape[0], generator=generator) < p).long()
    for i in torch.nonzero(labels).flatten().tolist():
        out, m = _KINDS[kind](images[i].cpu(), generator=generator)
        images[i], masks[i] = out.to(images.device), m
    return images, masks.to(images.device), labels.to(images.device)
