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
    cost        : stage1_step_cost         FLOPs and saved activations of one stage-1 step, on the meta device

Memory does not grow with the training set: stage 1, stage 2, the k-means baseline and scoring read
the data batch by batch (``contaminate``'s sets keep at most ``ITEM_CACHE_BYTES`` of decoded items), and
the contrastive loss, whose similarity matrix is (2·B·|Ω|)² (at r = 1 and B = 1024, 131,072² logits), is
computed in row blocks of at most ``NT_XENT_MAX_ELEMENTS`` logits.

Labels: the paper writes y = 1 for *normal*; the datasets of this book write label 0 for normal.
Functions below take ``normal`` (1 = normal, 0 = anomaly), the paper's y, and the detector converts.

The paper has no public code: everything is a reimplementation from the text; the choices it
leaves open (feature normalisation, β's scale, one update step, variance over the batch, ...)
are listed in the chapter's "Reimplementation notes" and marked "choice" below.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _recompute_in_backward
from torch.utils.data import DataLoader, Dataset

from .. import dryrun, train
from ..data.base import stack
from .base import Detector

__all__ = [
    "AnoMemConfig", "BasicBlock", "Bottleneck", "ResNet", "Hopfield", "KMeansPrototypes", "AnoMemNet",
    "nt_xent", "memorize", "variance_loss", "multiscale_loss", "augment", "deviation_maps",
    "one_class_scores", "ScaleDetector", "double_hinge", "fuse", "contaminate", "AnoMemDetector", "kmeans_pp",
    "stage1_step_cost", "NT_XENT_MAX_ELEMENTS",
]

# The largest similarity block nt_xent builds at once (2^27 logits: 512 MB in float32). Above it the
# loss is computed in row blocks, each recomputed in the backward pass instead of kept (same value).
NT_XENT_MAX_ELEMENTS = 2 ** 27
SCORE_BATCH = 256  # at most this many images per encoder pass without gradients
ITEM_CACHE_BYTES = 256 * 2 ** 20  # training items kept in memory between epochs, at most (see contaminate)


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class AnoMemConfig:
    """AnoMem's settings; ``AnoMemConfig.for_profile("paper")`` gives the paper's (Sec. 4.2)."""

    depth: int = 50  # ResNet-50 (Bottleneck blocks); 18 and 10 (one block per stage) give BasicBlocks
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
    kmeans_iters: int = 50  # Lloyd iterations of the Table 4 baseline (each one pass over the normal images)
    kmeans_sample: int = 65536  # at most this many feature vectors, drawn at random, seed k-means++
    memory_init: str = "random"  # stored patterns at the start: "random" (N(0, 1): the paper's "randomly
    # initialized"), "unit" (the same, scaled to unit norm) or "data" (the unit features of random positions of
    # the first training batch). Our layer normalises the patterns, so a step turns an N(0, 1) pattern of norm
    # ≈ √d by about lr·‖grad‖/d: a short training hardly moves a random memory. Measured (ResNet-18 at 16 px,
    # digits 0-2, seeds 0-2, mean one-class AUROC): 71.8 ± 7.2 % random, 81.6 ± 8.5 % unit, 82.8 ± 2.9 % data.
    threads: int = 0  # torch threads while training/scoring (0: torch's default); smoke uses 1, see below

    @classmethod
    def for_profile(cls, profile: str = "smoke", **overrides) -> "AnoMemConfig":
        from ..profiles import get

        if get(profile).is_smoke:  # 12-px digits: a narrow ResNet-10, small memories, seconds of CPU
            base = cls(depth=10, width=8, image_size=12, memory_sizes=(32, 16), epochs=45, batch_size=256,
                       lr=0.1, stage2_epochs=150, stage2_lr=0.05, hidden=32, crop_scale=(0.5, 1.0),
                       flip=False, blur=False, memory_init="data", threads=1)
            # memory_init="data": the stored patterns are normalised in the layer, so a step on an N(0, 1) pattern
            # of norm ≈ √d turns it by about lr·‖grad‖/d; in 45 steps a random memory stays near where chance put
            # it (measured, ResNet-18 at 16 px, mean one-class AUROC over digits 0-2, seeds 0-2: 71.8 ± 7.2 %
            # random, 82.8 ± 2.9 % data). ResNet-10 at 12 px: three seeds of every compared model in the chapter;
            # its one-class mean over seeds 0-8 is 82.6 ± 7.1 %: a higher level, not a smaller spread.
            # Measured on the γ = 0 trainings of digits 0-2, seeds 0-8 (mean ± sd over seeds): 135 epochs 88.1 ± 3.0 %,
            # 90 epochs 86.6 ± 6.2 %, lr 0.05 84.4 ± 3.9 %, lr 0.025 86.0 ± 7.1 %, batch 64 81.2 ± 5.7 %. Only more steps
            # clearly help, at a cost the smoke chapter (48 trainings) cannot pay.
            # threads=1: this small training is chaotic; a different thread count changes float sums in the
            # convolutions and, after 45 steps, the AUROCs by several points. One thread gives the same
            # numbers whatever the machine's core count (and is no slower for 12-px images).
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
        block, counts = {10: (BasicBlock, (1, 1, 1, 1)), 18: (BasicBlock, (2, 2, 2, 2)),
                         50: (Bottleneck, (3, 4, 6, 3))}[depth]
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


def _generator(device, seed: int) -> torch.Generator | None:
    """A seeded generator on ``device``: CUDA's random kernels refuse a CPU generator. Meta tensors hold
    no numbers, so a draw for them needs none (None)."""
    device = torch.device(device)
    return None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)


def kmeans_pp(x: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """k-means++ seeds: k rows of ``x`` (n×d), the first uniform, each next one drawn ∝ the squared
    distance to the nearest seed so far. The draws use a generator on ``x``'s device."""
    g = _generator(x.device, seed)
    c = x[torch.randint(len(x), (1,), generator=g, device=x.device)]
    while len(c) < k:
        d2 = torch.cdist(x, c).min(1).values ** 2
        c = torch.cat([c, x[torch.multinomial(d2 + 1e-12, 1, generator=g)]])
    return c


class KMeansPrototypes(nn.Module):
    """Table 4 baseline: k-means centroids of normal features replace the Hopfield memory;
    retrieval returns the closest centroid (on the unit sphere, like :class:`Hopfield`)."""

    def __init__(self, *, dim: int, patterns: int):
        super().__init__()
        self.register_buffer("centroids", torch.zeros(patterns, dim))

    @torch.no_grad()
    def fit(self, vectors: torch.Tensor, *, iters: int = 50, seed: int = 0) -> "KMeansPrototypes":
        """Lloyd's k-means with k-means++ seeding on unit-normalised ``vectors`` (n×d)."""
        return self.fit_stream(lambda: iter([vectors]), iters=iters, seed=seed, sample=len(vectors))

    @torch.no_grad()
    def fit_stream(self, batches, *, iters: int = 50, seed: int = 0, sample: int = 65536) -> "KMeansPrototypes":
        """Lloyd's k-means over data that need not fit in memory: ``batches()`` yields the vectors (n_b×d)
        afresh for every pass. k-means++ seeds come from at most ``sample`` vectors drawn uniformly
        (all of them when there are fewer); each Lloyd iteration is one pass that sums the vectors
        assigned to each centroid. With a single batch this is :meth:`fit`, number for number."""
        keys_gen = torch.Generator().manual_seed(seed + 1)  # the sample's random keys (CPU, own stream)
        pool, keys = None, None
        for xb in batches():  # a uniform sample: the `sample` vectors of smallest random key, in order
            xb = F.normalize(xb.float(), dim=-1)
            kb = torch.rand(len(xb), generator=keys_gen)
            pool = xb if pool is None else torch.cat([pool, xb])
            keys = kb if keys is None else torch.cat([keys, kb])
            if len(pool) > sample:
                keep = keys.topk(sample, largest=False).indices.sort().values
                pool, keys = pool[keep.to(pool.device)], keys[keep]
        k = min(len(self.centroids), len(pool))
        c = kmeans_pp(pool, k, seed=seed)
        del pool, keys
        for _ in range(iters):
            sums, counts = torch.zeros_like(c), [0] * k
            for xb in batches():
                xb = F.normalize(xb.float(), dim=-1)
                assign = torch.cdist(xb, c).argmin(1)
                for j in range(k):
                    m = assign == j
                    if m.any():
                        sums[j] += xb[m].sum(0)
                        counts[j] += int(m.sum())
            for j in range(k):
                if counts[j]:
                    c[j] = sums[j] / counts[j]
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

def _nt_xent_rows(z: torch.Tensor, lo: int, hi: int, tau: float) -> torch.Tensor:
    """Eq. (5) for the anchors lo..hi−1 of the multi-view batch ``z`` (2n×d, unit rows): (hi − lo) losses."""
    n2 = len(z)
    sim = z[lo:hi] @ z.T / tau  # (hi−lo)×2n
    rows = torch.arange(lo, hi, device=z.device)
    sim = sim.masked_fill(rows[:, None] == torch.arange(n2, device=z.device)[None], float("-inf"))  # p ≠ z
    return F.cross_entropy(sim, (rows + n2 // 2) % n2, reduction="none")  # positive: the other view


def nt_xent(a: torch.Tensor, b: torch.Tensor, *, tau: float = 0.1,
            max_elements: int | None = None) -> torch.Tensor:
    """Eq. (5) for both directions: the 2n anchors' losses (2n), l(a_k, b_k) then l(b_k, a_k).

    l(z, z') = −log exp(sim(z, z')/τ) / Σ_{p ≠ z} exp(sim(z, p)/τ), p over the 2n vectors of the
    multi-view batch; sim is the cosine similarity.

    The 2n×2n similarity matrix is built whole when it has at most ``max_elements`` entries (default
    :data:`NT_XENT_MAX_ELEMENTS`); above, in blocks of rows of at most that many entries, each block
    checkpointed (recomputed in the backward pass), so memory stays bounded whatever n is."""
    z = F.normalize(torch.cat([a, b]), dim=-1)  # 2n×d
    n2 = len(z)
    rows = max(1, (max_elements or NT_XENT_MAX_ELEMENTS) // n2)
    if rows >= n2:
        return _nt_xent_rows(z, 0, n2, tau)
    return torch.cat([_recompute_in_backward(_nt_xent_rows, z, lo, min(lo + rows, n2), tau,
                                             use_reentrant=False, preserve_rng_state=False)
                      for lo in range(0, n2, rows)])


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

class _Contaminated(Dataset):
    """``normal_set`` (label 0) followed by the items ``pick`` of ``anomaly_pool`` (relabelled 1), read
    from the two sets item by item: no image is copied. Items read once are kept for later epochs while
    they fit in ``ITEM_CACHE_BYTES`` (a CUB-200 class at 32 px is 0.4 MB; without it, its JPEGs would be
    decoded again in each of 500 one-step epochs), so memory stays bounded whatever the set's size."""

    def __init__(self, normal_set, anomaly_pool, pick, *, name: str):
        self.normal_set, self.anomaly_pool, self.pick = normal_set, anomaly_pool, [int(i) for i in pick]
        self.name, self.category, self.has_masks = name, name, False
        self.labels = np.r_[np.zeros(len(normal_set)), np.ones(len(self.pick))].astype(np.int64)
        self._cache, self._cached_bytes = {}, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i, n = i % len(self), len(self.normal_set)
        if i in self._cache:
            return dict(self._cache[i])
        item = self.normal_set[i] if i < n else self.anomaly_pool[self.pick[i - n]]
        item = {**item, "label": int(self.labels[i]), "category": self.name}
        size = sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
        if self._cached_bytes + size <= ITEM_CACHE_BYTES:
            self._cache[i], self._cached_bytes = item, self._cached_bytes + size
        return dict(item)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, anomalous={len(self.pick)})"


def contaminate(normal_set, anomaly_pool, gamma: float, *, seed: int = 0) -> Dataset:
    """The training set of ratio γ: all images of ``normal_set`` (label 0) plus ⌈γ·n⌉ images drawn with
    ``seed`` from ``anomaly_pool`` (label 1). γ = 0 is the one-class setting. The images stay in the two
    sets and are read item by item (``.labels`` holds the labels)."""
    n_anom = int(math.ceil(gamma * len(normal_set) - 1e-9))
    pick = np.sort(np.random.default_rng(seed).choice(len(anomaly_pool), size=n_anom, replace=False)) if n_anom else []
    name = f"{getattr(normal_set, 'name', 'train')} + γ={gamma:g}"
    return _Contaminated(normal_set, anomaly_pool, pick, name=name)


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
    batch_size_trains = True  # uadkit.models.create(batch_size=) sets config.batch_size (the stage-1 batch B) too
    trains_on_anomalies = True  # the semi-supervised setting (γ > 0) trains on labelled anomalies

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
            self._fit_both(train_loader.dataset, checkpoint)

    def _fit_both(self, dataset, checkpoint=None) -> None:
        """Both stages on ``dataset``, read batch by batch (no copy of the training set is held)."""
        c = self.config
        torch.manual_seed(self.seed)
        n, normal = len(dataset), 1 - _labels(dataset)  # the paper's y: 1 = normal
        self.net = AnoMemNet(config=c).to(self.device)
        self._gen = train.make_generator(self.seed)
        data = DataLoader(dataset, batch_size=min(c.batch_size, n), shuffle=True, drop_last=n > c.batch_size,
                          generator=train.make_generator(self.seed), collate_fn=_views)
        opt = torch.optim.SGD(self.net.parameters(), lr=c.lr, momentum=0.9, nesterov=True, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs)
        if c.memory_init not in ("random", "unit", "data"):
            raise ValueError(f"memory_init must be 'random', 'unit' or 'data', got {c.memory_init!r}")
        if c.memory_init == "data" and c.prototypes == "hopfield":
            self._init_memory(next(iter(data))[0])
        elif c.memory_init == "unit" and c.prototypes == "hopfield":
            with torch.no_grad():
                for s in range(len(c.scales)):
                    self.net.memory(s).patterns.copy_(F.normalize(self.net.memory(s).patterns, dim=-1))
        self.history = train.fit(self.net, self._stage1_loss, data, epochs=c.epochs, optimizer=opt, scheduler=sched,
                                 device=self.device, checkpoint=checkpoint, desc="AnoMem stage 1", progress=self.progress)
        if dryrun.active():
            self._recompute_bn_statistics(next(iter(data))[0])
        self.net.eval()
        if c.prototypes == "kmeans":
            self._fit_kmeans(dataset, np.flatnonzero(normal.numpy()))
        self.detectors = None
        if (normal == 0).any() and (normal == 1).any():
            self._fit_stage2(dataset, normal)

    @torch.no_grad()
    def _init_memory(self, images: torch.Tensor) -> None:
        """``memory_init="data"``: every stored pattern starts as the unit feature vector of a random spatial
        position of a random image of ``images`` (one training batch, encoder as initialised, eval mode)."""
        self.net.eval()
        z = self.net.features(images.to(self.device))
        for s, zs in enumerate(z):
            v = F.normalize(zs.permute(0, 2, 3, 1).reshape(-1, zs.shape[1]).float(), dim=-1)
            mem = self.net.memory(s)
            pick = torch.randperm(len(v), generator=self._gen)[:len(mem.patterns)].to(v.device)
            rows = v[pick]
            if len(rows) < len(mem.patterns):  # fewer vectors than patterns: the rest stay random, unit norm
                rest = F.normalize(mem.patterns[len(rows):], dim=-1)
                rows = torch.cat([rows, rest])
            mem.patterns.copy_(rows)
        self.net.train()

    @torch.no_grad()
    def _recompute_bn_statistics(self, images: torch.Tensor) -> None:
        """BatchNorm's running statistics, recomputed from ``images`` with the final weights (dry run only).
        One or two steps at the paper's learning rate move the weights far from those the running averages
        saw, and a ResNet-50's eval-mode forward then overflows to inf; a full training has no such gap."""
        norms = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum, m._saved_momentum = None, m.momentum  # None: a plain mean over the batches seen (one)
        self.net.train()
        with _autocast(self.device):
            self.net.features(images.to(self.device))
        for m in norms:
            m.momentum = m._saved_momentum
            del m._saved_momentum
        self.net.eval()
        dryrun.note("AnoMem: BatchNorm statistics recomputed from one training batch after stage 1 "
                    "(2 steps leave them stale)")

    def _image_batches(self, dataset, indices):
        """The images ``indices`` of ``dataset``, ``config.batch_size`` (B) at a time (B×3×H×W on the CPU)."""
        for lo in range(0, len(indices), self.config.batch_size):
            yield stack(dataset, "image", indices=indices[lo:lo + self.config.batch_size])

    @torch.no_grad()
    def _fit_kmeans(self, dataset, indices) -> None:
        """Table 4 baseline: k-means on the features of the normal images ``indices``, one pass per iteration."""
        c = self.config
        for s in range(len(c.scales)):
            def vectors(s=s):
                for images in self._image_batches(dataset, indices):
                    zs = self._features(images)[s]
                    yield zs.permute(0, 2, 3, 1).reshape(-1, zs.shape[1])
            self.net.memory(s).fit_stream(vectors, iters=dryrun.steps(c.kmeans_iters), seed=self.seed,
                                          sample=c.kmeans_sample)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """z(s) of ``images`` (float32), SCORE_BATCH images per pass; the encoder runs under the same bf16
        autocast as in training where that is on (:func:`uadkit.train.use_amp`: CUDA, and any dry run)."""
        with _autocast(self.device):
            out = [self.net.features(images[i:i + SCORE_BATCH].to(self.device))
                   for i in range(0, len(images), SCORE_BATCH)]
        return [torch.cat(parts).float() for parts in zip(*out)]

    @torch.no_grad()
    def deltas(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Δ(s) for every scale, Eq. (8)."""
        self.net.eval()
        with _threads(self.config.threads):
            z = self._features(images)
            return deviation_maps(z, [self.net.memory(s) for s in range(len(z))])

    # stage 2 --------------------------------------------------------------------------------
    def _fit_stage2(self, dataset, normal: torch.Tensor) -> None:
        """Eq. (12): L_SUP = 1/(S·B) Σ_k Σ_s l_dist(g(s)∘φ(Δ(s)_k), y_k), encoder and memory frozen.

        SGD on batches of ``batch_size`` (Sec. 4.2), Δ computed per batch. When the training set is one
        batch, its Δ is computed once and reused every epoch (the encoder is frozen: the same numbers)."""
        c = self.config
        torch.manual_seed(self.seed)
        n, bs = len(dataset), min(c.batch_size, len(dataset))
        shapes = [d.shape[1:] for d in self.deltas(stack(dataset, "image", indices=[0]))]  # C×H×W per scale
        self.detectors = nn.ModuleList([ScaleDetector(channels=sh[0], pool=min(c.pool, sh[-1]), hidden=c.hidden)
                                        for sh in shapes]).to(self.device)
        opt = torch.optim.SGD(self.detectors.parameters(), lr=c.stage2_lr, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.stage2_epochs)
        order_gen, held = train.make_generator(self.seed), None
        steps, max_steps = 0, dryrun.steps(c.stage2_epochs * math.ceil(n / bs))
        for _ in range(dryrun.epochs(c.stage2_epochs)):
            order = torch.arange(n) if n <= bs else torch.randperm(n, generator=order_gen)
            for lo in range(0, n, bs):
                idx = order[lo:lo + bs]
                delta = held if held is not None else self.deltas(stack(dataset, "image", indices=idx))
                held = delta if n <= bs else None
                y = normal[idx].to(self.device)
                loss = torch.stack([double_hinge(g(d), y, margin=c.margin)
                                    for g, d in zip(self.detectors, delta)]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if steps >= max_steps:
                    break
            sched.step()
            if steps >= max_steps:
                break
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
        """Fused scores (Eq. 13) of every image of ``dataset`` per setting, plus per-scale ones (on the CPU).
        Images are scored ``config.batch_size`` at a time."""
        parts = [{k: v.cpu() for k, v in self.scale_scores(x).items()}
                 for x in self._image_batches(dataset, np.arange(len(dataset)))]
        per = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        out = {k: fuse(v, self.config.lambdas) for k, v in per.items()}
        out.update({f"{k} scale {s + 1}": v[:, s] for k, v in per.items() for s in range(v.shape[1])})
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


def _autocast(device):
    """The bf16 autocast of training (:func:`uadkit.train.use_amp`) for passes without gradients, where it
    is on; nothing elsewhere (smoke's CPU, and devices autocast does not know, such as "meta")."""
    on = train.use_amp(device) and torch.device(device).type in ("cuda", "cpu")
    return train.autocast(device, True) if on else contextlib.nullcontext()


def _labels(dataset) -> torch.Tensor:
    """The labels of ``dataset`` (N, int64), without reading its images where it lists them (``.labels``)."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return stack(dataset, "label")


def _views(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """A stage-1 batch: images B×3×H×W and the paper's y (B, 1 = normal)."""
    return torch.stack([it["image"] for it in items]), 1 - torch.tensor([int(it["label"]) for it in items])


# --------------------------------------------------------------------------- cost

def stage1_step_cost(config: AnoMemConfig, batch_size: int):
    """FLOPs and saved activations (:class:`uadkit.cost.StepCost`) of one stage-1 optimiser step at
    ``config``'s sizes: two augmented views of ``batch_size`` normal images, Eq. (7), backward. Counted
    on the meta device: shapes only, nothing is computed, seconds on any machine."""
    import torch.fx.experimental._config as fx_config

    from .. import cost

    with torch.device("meta"):
        net = AnoMemNet(config=config)
    det = AnoMemDetector(config, device="meta")
    det._gen = train.make_generator(0)
    s = config.image_size
    x = torch.rand(batch_size, 3, s, s, device="meta")
    normal = torch.ones(batch_size, dtype=torch.int64, device="meta")
    # variance_loss keeps the normal samples (a nonzero, which meta tensors cannot count): all of them here
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        return cost.measure(lambda: det._stage1_loss(net, (x, normal)).backward(), net)
