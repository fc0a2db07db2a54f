"""AnoMem: "Anomaly Detection via Multi-Scale Contrasted Memory"
(Jezequel, Vu, Beaudet & Histace, 2022; arXiv:2211.09041).

Two stages on a ResNet trained from scratch (no pretrained weights anywhere):

    torch_model : ResNet                   a CIFAR-style ResNet-18/50 returning every stage's map
                  Hopfield                 Eq. (1): N learnable stored patterns, softmax(β ξ X) Xᵀ
                  AnoMemNet                encoder + one Hopfield memory per scale
    stage 1     : nt_xent                  Eq. (5): SimCLR's NT-Xent, τ = 0.1
                  memorize                 Eq. (3): Mem(z, y) = y·HF(z) + (1 − y)·z  (y = 1: normal)
                  variance_loss            Eq. (6): −√Var of the retrieved prototypes
                  multiscale_loss          Eq. (4) + (7): contrasted memory loss on sampled spatial vectors
    anomaly_map : deviation_maps           Eq. (8): Δ(s) = z(s) − HF(s)(z(s))
                  one_class_scores         Eq. (9): ‖Δ(s)‖₂ per scale
                  ScaleDetector            Eq. (10): average pooling + 2-layer MLP on Δ(s)
                  double_hinge             Eq. (11)–(12): the distance loss of stage 2, margin M
                  fuse                     Eq. (13): λ(s)-weighted mean over scales, λ(s) = 2^(s−1)
    baseline    : KMeansPrototypes         Table 4: k-means centroids of the learned features as prototypes

Labels: the paper writes y = 1 for *normal*; the datasets of this book write label 0 for normal.
Functions below take ``normal`` (1 = normal, 0 = anomaly), the paper's y, and the detector converts.

The paper has no public code: everything is a reimplementation from the text; the choices it
leaves open (feature normalisation, β's scale, one update step, variance over the batch, ...)
are listed in the chapter's "Reimplementation notes" and marked "choice" below.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .. import train
from ..data.base import ArrayDataset
from .base import Detector

__all__ = [
    "AnoMemConfig", "BasicBlock", "Bottleneck", "ResNet", "Hopfield", "KMeansPrototypes", "AnoMemNet",
    "nt_xent", "memorize", "variance_loss", "multiscale_loss", "augment", "deviation_maps",
    "one_class_scores", "ScaleDetector", "double_hinge", "fuse", "contaminate", "AnoMemDetector",
]


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class AnoMemConfig:
    """AnoMem's settings; ``AnoMemConfig.for_profile("paper")`` gives the paper's (Sec. 4.2)."""

    depth: int = 50  # ResNet-50 (Bottleneck blocks); 18 gives BasicBlocks
    width: int = 64  # channels of the first stage (64 in a standard ResNet)
    image_size: int = 32
    memory_sizes: tuple[int, ...] = (512, 256)  # N_Mem per scale: after stage 3, after the last stage
    ratios: tuple[float, ...] = (0.3, 1.0)  # r(s): share of the spatial vectors sampled in stage 1
    multi_scale: bool = True  # False: the last scale only (Table 4 "single scale")
    prototypes: str = "hopfield"  # or "kmeans": plain SimCLR, then k-means centroids (Table 4 baseline)
    beta: float = 2.0  # inverse temperature of Eq. (1)
    update_steps: int = 1  # iterations of Eq. (1) (choice: one step, as hflayers does by default)
    tau: float = 0.1  # NT-Xent temperature
    lambda_v: float = 0.05  # weight of the variance loss, Eq. (7)
    margin: float = 2.0  # M of the double-hinge loss, Eq. (11)
    epochs: int = 500  # stage 1 (not given in the paper; SimCLR's CIFAR schedule)
    batch_size: int = 1024
    lr: float = 0.5  # SGD + Nesterov, cosine annealing (lr not given in the paper)
    weight_decay: float = 1e-4
    stage2_epochs: int = 100
    stage2_lr: float = 0.01
    pool: int = 2  # φ: average pooling of Δ(s) to pool×pool before the MLP (size not given)
    hidden: int = 512  # hidden units of the MLP g(s) (not given)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # SimCLR's random resized crop
    flip: bool = True
    jitter: float = 0.4  # brightness / contrast / saturation strength
    noise: float = 0.05  # std of the added Gaussian noise
    blur: bool = True
    threads: int = 0  # torch threads while training/scoring (0: torch's default); smoke uses 1, see below

    @classmethod
    def for_profile(cls, profile: str = "smoke", **overrides) -> "AnoMemConfig":
        from ..profiles import get

        if get(profile).is_smoke:  # 16-px digits: a narrow ResNet-18, small memories, seconds of CPU
            base = cls(depth=18, width=8, image_size=16, memory_sizes=(32, 16), epochs=45, batch_size=256,
                       lr=0.1, stage2_epochs=150, stage2_lr=0.05, hidden=32, crop_scale=(0.5, 1.0),
                       flip=False, blur=False, threads=1)
            # threads=1: this small training is chaotic; a different thread count changes float sums in the
            # convolutions and, after 45 steps, the AUROCs by tens of points. One thread gives the same
            # numbers on every machine (and is no slower for 16-px images).
        else:
            base = cls()
        return dataclasses.replace(base, **overrides)

    @property
    def lambdas(self) -> tuple[float, ...]:
        """λ(s) = 2^(s−1) over the scales in use (Sec. 4.2)."""
        return tuple(2.0 ** s for s in range(len(self.scales)))

    @property
    def scales(self) -> tuple[int, ...]:
        """Indices into ``memory_sizes`` / ``ratios`` of the scales in use."""
        n = len(self.memory_sizes)
        return tuple(range(n)) if self.multi_scale else (n - 1,)


# --------------------------------------------------------------------------- torch_model: ResNet

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, *, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, *, cin: int, cout: int, stride: int):
        super().__init__()
        mid, out = cout, cout * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out))
        self.short = nn.Identity() if stride == 1 and cin == out else nn.Sequential(
            nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """A ResNet with the CIFAR stem (3×3 conv, no max-pool), as SimCLR uses on 32-px images.

    ``forward`` returns the four stage maps f(1..4): B×w×H×W, B×2w×H/2×W/2, B×4w×H/4×W/4, B×8w×H/8×W/8
    (times 4 channels with Bottleneck blocks)."""

    def __init__(self, *, depth: int = 18, width: int = 64):
        super().__init__()
        block, counts = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}[depth]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, n in enumerate(counts):
            cout = width * 2 ** i
            layers = []
            for j in range(n):
                layers.append(block(cin=cin, cout=cout, stride=2 if (j == 0 and i > 0) else 1))
                cin = cout * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.channels = [width * 2 ** i * block.expansion for i in range(4)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


# --------------------------------------------------------------------------- torch_model: memory

class Hopfield(nn.Module):
    """A modern Hopfield layer with N learnable stored patterns X (d×N), Eq. (1):

        ξ(t+1) = softmax(β ξ(t) X) Xᵀ

    Choices (the paper leaves them open): queries ξ and stored patterns are L2-normalised, so the
    layer works on the sphere where NT-Xent's cosine similarity lives; the logits are
    β·√d·cos(ξ, x_n), i.e. β multiplies the 1/√d scaling of hflayers applied to vectors of norm √d;
    ``steps`` iterations (default 1: one retrieval, hflayers' default).
    Works on any ``…×d`` tensor (feature vectors in the last dimension)."""

    def __init__(self, *, dim: int, patterns: int, beta: float = 2.0, steps: int = 1):
        super().__init__()
        self.patterns = nn.Parameter(torch.randn(patterns, dim))  # N×d (rows are x_n)
        self.beta, self.steps, self.dim = beta, steps, dim

    def stored(self) -> torch.Tensor:
        return F.normalize(self.patterns, dim=-1)  # N×d

    def attention(self, xi: torch.Tensor) -> torch.Tensor:
        """softmax(β ξ X): …×N, how much each stored pattern takes part in the retrieval."""
        logits = F.normalize(xi, dim=-1) @ self.stored().T  # …×N cosine similarities
        return torch.softmax(self.beta * math.sqrt(self.dim) * logits, dim=-1)

    def forward(self, xi: torch.Tensor) -> torch.Tensor:  # …×d → …×d (unit-norm patterns' mixture)
        for _ in range(self.steps):
            xi = self.attention(xi) @ self.stored()
        return xi


class KMeansPrototypes(nn.Module):
    """Table 4 baseline: k-means centroids of normal features replace the Hopfield memory;
    retrieval returns the closest centroid (on the unit sphere, like :class:`Hopfield`)."""

    def __init__(self, *, dim: int, patterns: int):
        super().__init__()
        self.register_buffer("centroids", torch.zeros(patterns, dim))

    @torch.no_grad()
    def fit(self, vectors: torch.Tensor, *, iters: int = 50, seed: int = 0) -> "KMeansPrototypes":
        """Lloyd's k-means with k-means++ seeding on unit-normalised ``vectors`` (n×d)."""
        x = F.normalize(vectors.float(), dim=-1)
        k, g = min(len(self.centroids), len(x)), torch.Generator().manual_seed(seed)
        c = x[torch.randint(len(x), (1,), generator=g)]
        while len(c) < k:  # k-means++: next centre drawn ∝ squared distance to the nearest one
            d2 = torch.cdist(x, c).min(1).values ** 2
            c = torch.cat([c, x[torch.multinomial(d2 + 1e-12, 1, generator=g)]])
        for _ in range(iters):
            assign = torch.cdist(x, c).argmin(1)
            for j in range(k):
                if (assign == j).any():
                    c[j] = x[assign == j].mean(0)
        self.centroids = torch.zeros_like(self.centroids)
        self.centroids[:k] = F.normalize(c, dim=-1)
        self.centroids[k:] = self.centroids[0]
        return self

    def forward(self, xi: torch.Tensor) -> torch.Tensor:  # …×d → …×d nearest centroid
        q = F.normalize(xi, dim=-1)
        idx = (q.reshape(-1, q.shape[-1]) @ self.centroids.T).argmax(-1)
        return self.centroids[idx].reshape(q.shape)


class AnoMemNet(nn.Module):
    """Encoder f = f(4)∘…∘f(1) and one memory per scale.

    Scale 1 = the map after stage 3 (B×C3×H3×W3, memorised as H3·W3 vectors); scale 2 = the last
    stage, global-average-pooled to B×C4×1×1 (choice: the flattened 1-D output z of the paper)."""

    def __init__(self, *, config: AnoMemConfig):
        super().__init__()
        self.config = config
        self.encoder = ResNet(depth=config.depth, width=config.width)
        dims = [self.encoder.channels[2], self.encoder.channels[3]]
        if config.prototypes == "hopfield":
            mem = [Hopfield(dim=d, patterns=n, beta=config.beta, steps=config.update_steps)
                   for d, n in zip(dims, config.memory_sizes)]
        elif config.prototypes == "kmeans":
            mem = [KMeansPrototypes(dim=d, patterns=n) for d, n in zip(dims, config.memory_sizes)]
        else:
            raise ValueError(f"prototypes must be 'hopfield' or 'kmeans', got {config.prototypes!r}")
        self.memories = nn.ModuleList(mem)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """z(s) for every scale in use: B×C(s)×H(s)×W(s) (the last one is 1×1)."""
        maps = self.encoder(x)
        z = [maps[2], maps[3].mean((2, 3), keepdim=True)]
        return [z[s] for s in self.config.scales]

    def memory(self, s: int) -> nn.Module:
        return self.memories[self.config.scales[s]]


# --------------------------------------------------------------------------- stage 1 loss

def nt_xent(a: torch.Tensor, b: torch.Tensor, *, tau: float = 0.1) -> torch.Tensor:
    """Eq. (5) for both directions: the 2n anchors' losses (2n), l(a_k, b_k) then l(b_k, a_k).

    l(z, z') = −log exp(sim(z, z')/τ) / Σ_{p ≠ z} exp(sim(z, p)/τ), p over the 2n vectors of the
    multi-view batch; sim is the cosine similarity."""
    n = len(a)
    z = F.normalize(torch.cat([a, b]), dim=-1)  # 2n×d
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # p ≠ z
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positive, reduction="none")


def memorize(z: torch.Tensor, memory: nn.Module, normal: torch.Tensor) -> torch.Tensor:
    """Eq. (3): Mem(z, y) = y·HF(z) + (1 − y)·z; the memory is bypassed for anomalies (y = 0).
    ``z`` n×d, ``normal`` n (1 = normal). Both branches are compared by cosine, so z is normalised."""
    y = normal.to(z.dtype).unsqueeze(-1)
    return y * memory(z) + (1 - y) * F.normalize(z, dim=-1)


def variance_loss(mem: torch.Tensor, normal: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Eq. (6): −√Var of the retrieved prototypes of the normal samples (choice: variance over the
    normal samples of the batch, per feature, then averaged over features, as VICReg does)."""
    m = mem[normal.bool()]
    if len(m) < 2:
        return mem.sum() * 0.0
    return -torch.sqrt(m.var(0) + eps).mean()


def multiscale_loss(z1: list[torch.Tensor], z2: list[torch.Tensor], net: AnoMemNet, normal: torch.Tensor, *,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. (7): Σ_s λ(s) Σ_{(i,j)∈Ω(s)} [COM(z_ij, z'_ij, y) + λ_V·V(z_ij, y)] / Σ_s |Ω(s)|.

    ``z1``/``z2``: the two views' maps per scale (B×C×H×W). Ω(s): ⌊H W r(s)⌋ positions drawn without
    replacement, the same for both views and all images. COM, Eq. (4), is NT-Xent between Mem(z) and z'
    over all B·|Ω| vectors of the scale (the other positions count as negatives)."""
    c = net.config
    total, count = 0.0, 0
    for s, (a, b) in enumerate(zip(z1, z2)):
        B, C, H, W = a.shape
        k = max(1, int(H * W * c.ratios[c.scales[s]]))
        omega = torch.randperm(H * W, generator=generator)[:k].to(a.device)  # Ω(s)
        va = a.flatten(2)[:, :, omega].permute(0, 2, 1).reshape(-1, C)  # (B·k)×C
        vb = b.flatten(2)[:, :, omega].permute(0, 2, 1).reshape(-1, C)
        y = normal.repeat_interleave(k)  # B·k
        mem = memorize(va, net.memory(s), y) if c.prototypes == "hopfield" else va
        com = nt_xent(mem, vb, tau=c.tau).mean()  # Eq. (4): mean of the 2·B·k anchors
        var = variance_loss(mem, y) if c.prototypes == "hopfield" else 0.0
        total = total + c.lambdas[s] * k * (com + c.lambda_v * var)
        count += k
    return total / count


# --------------------------------------------------------------------------- augmentations

def augment(x: torch.Tensor, config: AnoMemConfig, generator: torch.Generator) -> torch.Tensor:
    """SimCLR's views on a B×3×H×W batch in [0,1]: random resized crop, flip, brightness / contrast /
    saturation jitter, Gaussian blur, Gaussian noise (Sec. 4.2). Random numbers from ``generator``."""
    B, _, H, W = x.shape
    r = lambda *s: torch.rand(*s, generator=generator).to(x.device)  # noqa: E731
    lo, hi = config.crop_scale
    area = lo + (hi - lo) * r(B)
    ratio = torch.exp((r(B) - 0.5) * math.log(4 / 3) * 2)  # aspect ratio in [3/4, 4/3]
    sx, sy = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    tx, ty = (1 - sx) * (2 * r(B) - 1), (1 - sy) * (2 * r(B) - 1)
    flip = torch.where(r(B) < 0.5, -1.0, 1.0) if config.flip else torch.ones(B, device=x.device)
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False,
                      padding_mode="reflection")
    j = config.jitter
    x = x * (1 + j * (2 * r(B, 1, 1, 1) - 1))  # brightness
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + j * (2 * r(B, 1, 1, 1) - 1)) + mean  # contrast
    grey = x.mean(1, keepdim=True)
    x = (x - grey) * (1 + j * (2 * r(B, 1, 1, 1) - 1)) + grey  # saturation
    if config.blur:
        k = torch.tensor([1.0, 2.0, 1.0], device=x.device) / 4
        kernel = (k[:, None] * k[None]).expand(3, 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        x = torch.where(r(B, 1, 1, 1) < 0.5, blurred, x)
    x = x + config.noise * torch.randn(x.shape, generator=generator).to(x.device)
    return x.clamp(0, 1)


# --------------------------------------------------------------------------- anomaly_map: stage 2

def deviation_maps(z: list[torch.Tensor], memories: list[nn.Module]) -> list[torch.Tensor]:
    """Eq. (8): Δ(s) = z(s) − HF(s)(z(s)), the memory applied to every spatial vector (on the unit
    sphere, like the memory). ``z`` B×C×H×W per scale → Δ B×C×H×W per scale."""
    out = []
    for zs, mem in zip(z, memories):
        v = F.normalize(zs.permute(0, 2, 3, 1), dim=-1)  # B×H×W×C
        out.append((v - mem(v)).permute(0, 3, 1, 2))
    return out


def one_class_scores(delta: list[torch.Tensor]) -> torch.Tensor:
    """Eq. (9): ‖Δ(s)‖₂ per scale → B×S (choice: divided by √(H W) so that a map of many positions
    and the 1×1 last scale are on the same footing)."""
    return torch.stack([d.flatten(1).norm(dim=1) / math.sqrt(d.shape[2] * d.shape[3]) for d in delta], 1)


def fuse(scores: torch.Tensor, lambdas) -> torch.Tensor:
    """Eq. (13): s_a = Σ_s λ(s) s_a(s) / Σ_s λ(s). ``scores`` B×S → B."""
    lam = torch.as_tensor(lambdas, dtype=scores.dtype, device=scores.device)
    return scores @ lam / lam.sum()


class ScaleDetector(nn.Module):
    """Eq. (10): s_a(s)(x) = g(s)∘φ(Δ(s)); φ = average pooling to pool×pool (≤ the map), g(s) = 2-layer MLP → 1."""

    def __init__(self, *, channels: int, pool: int, hidden: int):
        super().__init__()
        self.pool = pool
        self.mlp = nn.Sequential(nn.Linear(channels * pool * pool, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, delta: torch.Tensor) -> torch.Tensor:  # B×C×H×W → B
        return self.mlp(F.adaptive_avg_pool2d(delta, self.pool).flatten(1)).squeeze(1)


def double_hinge(d: torch.Tensor, normal: torch.Tensor, *, margin: float = 2.0) -> torch.Tensor:
    """Eq. (11): l(d, y) = y·max(d − 1/M, 0) + (1 − y)·max(M − d, 0), per sample (y = 1: normal).
    Normal distances are pulled inside the ball of radius 1/M, anomalies pushed beyond M."""
    y = normal.to(d.dtype)
    return y * F.relu(d - 1 / margin) + (1 - y) * F.relu(margin - d)


# --------------------------------------------------------------------------- data: anomaly ratio γ

def contaminate(normal_set, anomaly_pool, gamma: float, *, seed: int = 0) -> ArrayDataset:
    """The training set of ratio γ: all images of ``normal_set`` (label 0) plus ⌈γ·n⌉ images drawn with
    ``seed`` from ``anomaly_pool`` (label 1). γ = 0 is the one-class setting."""
    x = torch.stack([normal_set[i]["image"] for i in range(len(normal_set))])
    n_anom = int(math.ceil(gamma * len(x) - 1e-9))
    if n_anom:
        pick = np.sort(np.random.default_rng(seed).choice(len(anomaly_pool), size=n_anom, replace=False))
        x = torch.cat([x, torch.stack([anomaly_pool[int(i)]["image"] for i in pick])])
    labels = np.r_[np.zeros(len(normal_set)), np.ones(n_anom)].astype(np.int64)
    name = f"{getattr(normal_set, 'name', 'train')} + γ={gamma:g}"
    return ArrayDataset(x, labels, None, category=name, name=name, has_masks=False)


# --------------------------------------------------------------------------- detector

class _threads:
    """Run a block with ``n`` torch threads (n = 0: leave torch's setting alone), then restore it."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


class AnoMemDetector(Detector):
    """Stage 1 (contrastive learning with multi-scale memories) + stage 2 (deviation scores).

    Training labels decide the setting: with anomalies (label 1) in the training set, stage 2 trains
    the per-scale detectors of Eq. (10)–(12) and ``predict`` returns their fused distance; without,
    ``predict`` returns the fused one-class score of Eq. (9). Maps: ‖Δ(s)_ij‖ upsampled and fused."""

    name = "anomem"

    def __init__(self, config: AnoMemConfig | None = None, *, pretrained: bool = True, **kw):
        super().__init__(**kw)
        self.config = config or AnoMemConfig.for_profile("smoke")
        self.net: AnoMemNet | None = None
        self.detectors: nn.ModuleList | None = None
        self.history: list[float] = []

    # stage 1 --------------------------------------------------------------------------------
    def _stage1_loss(self, net: AnoMemNet, batch) -> torch.Tensor:
        images, normal = batch
        z1 = net.features(augment(images, self.config, self._gen))
        z2 = net.features(augment(images, self.config, self._gen))
        return multiscale_loss(z1, z2, net, normal, generator=self._gen)

    def _fit(self, train_loader, checkpoint=None) -> None:
        with _threads(self.config.threads):
            self._fit_both(train_loader, checkpoint)

    def _fit_both(self, train_loader, checkpoint=None) -> None:
        c = self.config
        torch.manual_seed(self.seed)
        images, labels = [], []
        for batch in train_loader:
            images.append(batch["image"])
            labels.append(torch.as_tensor(batch["label"]))
        images, normal = torch.cat(images), 1 - torch.cat(labels)  # the paper's y: 1 = normal
        self.net = AnoMemNet(config=c).to(self.device)
        self._gen = train.make_generator(self.seed)
        data = DataLoader(TensorDataset(images, normal), batch_size=min(c.batch_size, len(images)), shuffle=True,
                          drop_last=len(images) > c.batch_size, generator=train.make_generator(self.seed))
        opt = torch.optim.SGD(self.net.parameters(), lr=c.lr, momentum=0.9, nesterov=True, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs)
        self.history = train.fit(self.net, self._stage1_loss, data, epochs=c.epochs, optimizer=opt, scheduler=sched,
                                 device=self.device, checkpoint=checkpoint, desc="AnoMem stage 1", progress=self.progress)
        self.net.eval()
        if c.prototypes == "kmeans":
            self._fit_kmeans(images[normal.bool()])
        self.detectors = None
        if (normal == 0).any() and (normal == 1).any():
            self._fit_stage2(images, normal)

    @torch.no_grad()
    def _fit_kmeans(self, images: torch.Tensor) -> None:
        z = self._features(images)
        for s, zs in enumerate(z):
            self.net.memory(s).fit(zs.permute(0, 2, 3, 1).reshape(-1, zs.shape[1]), seed=self.seed)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = [self.net.features(images[i:i + 256].to(self.device)) for i in range(0, len(images), 256)]
        return [torch.cat(parts) for parts in zip(*out)]

    @torch.no_grad()
    def deltas(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Δ(s) for every scale, Eq. (8)."""
        self.net.eval()
        with _threads(self.config.threads):
            z = self._features(images)
            return deviation_maps(z, [self.net.memory(s) for s in range(len(z))])

    # stage 2 --------------------------------------------------------------------------------
    def _fit_stage2(self, images: torch.Tensor, normal: torch.Tensor) -> None:
        """Eq. (12): L_SUP = 1/(S·B) Σ_k Σ_s l_dist(g(s)∘φ(Δ(s)_k), y_k), encoder and memory frozen."""
        c = self.config
        torch.manual_seed(self.seed)
        delta = self.deltas(images)
        self.detectors = nn.ModuleList([ScaleDetector(channels=d.shape[1], pool=min(c.pool, d.shape[-1]), hidden=c.hidden)
                                        for d in delta]).to(self.device)
        opt = torch.optim.SGD(self.detectors.parameters(), lr=c.stage2_lr, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.stage2_epochs)
        y = normal.to(self.device)
        for _ in range(c.stage2_epochs):  # full batch: the training set's deviation maps are small
            loss = torch.stack([double_hinge(g(d), y, margin=c.margin) for g, d in zip(self.detectors, delta)]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        self.detectors.eval()

    # scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def scale_scores(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-scale scores B×S: "one-class" (Eq. 9) and, after stage 2, "semi-supervised" (Eq. 10)."""
        delta = self.deltas(images)
        out = {"one-class": one_class_scores(delta)}
        if self.detectors is not None:
            out["semi-supervised"] = torch.stack([g(d) for g, d in zip(self.detectors, delta)], 1)
        return out

    @torch.no_grad()
    def score_all(self, dataset) -> dict[str, torch.Tensor]:
        """Fused scores (Eq. 13) of every image of ``dataset`` per setting, plus per-scale ones."""
        x = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        per = self.scale_scores(x)
        out = {k: fuse(v, self.config.lambdas).cpu() for k, v in per.items()}
        out.update({f"{k} scale {s + 1}": v[:, s].cpu() for k, v in per.items() for s in range(v.shape[1])})
        return out

    @torch.no_grad()
    def _predict_batch(self, images):
        delta = self.deltas(images)
        lam = self.config.lambdas
        if self.detectors is not None:
            scores = fuse(torch.stack([g(d) for g, d in zip(self.detectors, delta)], 1), lam)
        else:
            scores = fuse(one_class_scores(delta), lam)
        maps = sum(l * F.interpolate(d.norm(dim=1, keepdim=True), size=images.shape[-2:], mode="bilinear",
                                     align_corners=False) for l, d in zip(lam, delta)) / sum(lam)
        return scores, maps
