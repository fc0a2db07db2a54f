"""Nearest-neighbour patch distance: the book's first baseline.

The idea (SPADE, Cohen & Hoshen 2020; PatchCore, Roth et al. 2022, without its
coreset): describe every image patch by frozen pretrained features, remember
the patches of the normal training images, and call a test patch anomalous in
proportion to its distance to the nearest remembered patch.

    torch_model : KNNModel      patch features  f(x) ∈ R^{C×h×w}, memory bank M ∈ R^{N×C}
    anomaly_map : anomaly_map   s(u) = min_{m∈M} ||f(x)(:,u) − m||_2, upsampled and smoothed
    image score : image_score   max_u s(u)

There is no loss: nothing is trained.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from .. import backbones
from ..profiles import get as get_profile
from .base import Detector

__all__ = ["KNNConfig", "KNNModel", "anomaly_map", "image_score", "KNNDetector"]


@dataclass(frozen=True)
class KNNConfig:
    backbone: str = "efficientnet_lite0"
    layers: tuple[int, ...] = (1, 2)  # stages of the backbone: lite0 strides 4 and 8 (PatchCore: WRN layer2+3)
    pool: int = 3  # local neighbourhood averaged into each patch feature (PatchCore's 3×3)
    max_bank: int = 50_000  # random subsample of the memory bank above this many patches
    sigma: float = 4.0  # Gaussian smoothing of the map, in pixels at 256 px (scaled with the image)
    chunk: int = 4096  # test patches compared at once (memory vs speed)

    @classmethod
    def for_profile(cls, profile: str = "smoke", **overrides) -> "KNNConfig":
        p = get_profile(profile)
        if p.is_smoke:  # a 10k-patch bank keeps a 64-px category under 3 s on 2 CPU cores
            base = cls(backbone=p.backbone, max_bank=10_000)
        else:  # PatchCore's choice: WideResNet-50 layers 2 and 3
            base = cls(backbone="wide_resnet50_2", layers=(2, 3))
        return dataclasses.replace(base, **overrides)


class KNNModel(nn.Module):
    """Frozen features → patch embeddings; a memory bank of normal patches; distance to it."""

    def __init__(self, *, backbone: nn.Module, layers: tuple[int, ...], pool: int):
        super().__init__()
        self.backbone, self.layers, self.pool = backbone, backbones.check_layers(backbone, layers), pool
        self.register_buffer("bank", torch.empty(0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images B×3×H×W → patch features B×C×h×w (the finest chosen stage's grid)."""
        feats = self.backbone(x)
        picked = [F.avg_pool2d(feats[i], self.pool, stride=1, padding=self.pool // 2) for i in self.layers]
        size = picked[0].shape[-2:]
        picked = [backbones.resize_aligned(f, size) for f in picked]
        return torch.cat(picked, dim=1)  # B×C×h×w, C = Σ channels of the chosen stages

    def remember(self, patches: torch.Tensor) -> None:
        """Store normal patch features N×C as the memory bank."""
        self.bank = patches

    def forward(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Distance of each patch to its nearest normal patch, B×1×h×w."""
        f = self.embed(x)
        b, c, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(-1, c)  # (B·h·w)×C
        d = torch.cat([torch.cdist(part, self.bank).min(dim=1).values for part in q.split(chunk)])
        return d.view(b, 1, h, w)


def anomaly_map(distances: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Patch distances B×1×h×w → map B×1×H×W at input resolution, Gaussian-smoothed (σ in pixels)."""
    m = backbones.resize_aligned(distances, size)
    if sigma > 0:
        k = 2 * int(4 * sigma + 0.5) + 1
        m = gaussian_blur(m, kernel_size=[k, k], sigma=[sigma, sigma])
    return m


def image_score(maps: torch.Tensor) -> torch.Tensor:
    """An image is as anomalous as its most anomalous pixel: B×1×H×W → B."""
    return maps.flatten(1).max(dim=1).values


class KNNDetector(Detector):
    name = "knn"

    def __init__(self, config: KNNConfig | None = None, *, pretrained: bool = True, **kw):
        super().__init__(**kw)
        self.config = config or KNNConfig()
        net = backbones.shared(self.config.backbone, pretrained=pretrained, device=self.device)
        self.model = KNNModel(backbone=net, layers=self.config.layers, pool=self.config.pool).to(self.device)

    @torch.no_grad()
    def _fit(self, train_loader, checkpoint=None) -> None:  # nothing is trained: no checkpoint
        """Fill the memory bank batch by batch: only the patches it keeps are ever stored.

        Above ``max_bank`` patches the bank is a uniform random subset (``torch.randperm`` with the
        detector's seed over all ``n_images·h·w`` patch positions, drawn before the first batch), so
        memory stays at ``max_bank × C`` however many training images there are.
        """
        n_images = len(train_loader.dataset)
        bank, start, slots = None, 0, None
        for batch in train_loader:
            f = self.model.embed(batch["image"].to(self.device))
            patches = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B·h·w)×C
            if bank is None:
                total = n_images * (len(patches) // len(f))  # patch positions of the whole training set
                if total > self.config.max_bank:
                    g = torch.Generator().manual_seed(self.seed)
                    keep = torch.randperm(total, generator=g)[: self.config.max_bank]  # bank row j ← position keep[j]
                    positions, rows = keep.sort()
                    slots = (positions, rows)
                bank = patches.new_empty(min(total, self.config.max_bank), patches.shape[1])
            end = start + len(patches)
            if slots is None:
                bank[start:end] = patches
            else:
                positions, rows = slots
                lo, hi = (int(torch.searchsorted(positions, v)) for v in (start, end))
                bank[rows[lo:hi].to(bank.device)] = patches[(positions[lo:hi] - start).to(bank.device)]
            start = end
        self.model.remember(bank)

    def _predict_batch(self, images):
        sigma = self.config.sigma * images.shape[-1] / 256
        maps = anomaly_map(self.model(images, self.config.chunk), images.shape[-2:], sigma)
        return image_score(maps), maps
