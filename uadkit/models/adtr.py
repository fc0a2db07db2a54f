"""ADTR: Anomaly Detection Transformer with feature reconstruction (You et al., 2022).

A frozen CNN turns an image into multi-scale features ``f``; a transformer
reconstructs them from a *learned auxiliary query* rather than from ``f``
itself, so it cannot simply copy anomalous features through; the
reconstruction error is the anomaly map.

    torch_model  : ADTRModel             f (B×C×h×w) → f̂ (B×C×h×w)
    anomaly_map  : anomaly_map           Eq. (2)–(3): s(u) = ||f(:,u) − f̂(:,u)||₂, upsampled
    image score  : image_score           max of the average-pooled map
    loss         : feature_mse           Eq. (1), normal images only
                   pseudo_huber          Eq. (6)
                   push_pull_loss        Eq. (7), ADTR+ with pixel labels
                   topk_image_loss       Eq. (8)–(9), ADTR+ with image labels

The ablations of the paper's Table 4 are switches of the same module:
``reconstructor="cnn"`` (a CNN instead of the transformer), ``attention=False``
(attention replaced by concatenation + projection), ``aux_query=False`` (the
decoder's input is the encoder output), ``target="pixels"`` (reconstruct pixel
patches instead of features), and ``layers`` (last layer vs multi-scale).
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backbones, dryrun, train
from ..backbones import resize_aligned
from ..data.base import loader
from .base import Detector

__all__ = [
    "ADTRConfig", "MultiScaleFeatures", "PixelPatches", "ADTRModel",
    "feature_difference", "anomaly_map", "image_score",
    "feature_mse", "pseudo_huber", "push_pull_loss", "topk_image_loss", "FeatureStore", "ADTRDetector",
]


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class ADTRConfig:
    """ADTR's settings; ``ADTRConfig.for_profile("paper")`` gives the paper's."""

    backbone: str = "efficientnet_b4"
    layers: tuple[int, ...] = (0, 1, 2, 3, 4)  # layer1–layer5 of EfficientNet-B4: 24+32+56+160+448 = 720 channels
    feature_stride: int = 16  # the feature grid is image_size / feature_stride (256 px → 16×16)
    dim: int = 256  # transformer width after the 1×1 reduction
    heads: int = 8
    ffn: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    reconstructor: str = "transformer"  # or "cnn" (Table 4a baseline)
    attention: bool = True  # False: concatenation + projection instead of attention (Table 4a)
    aux_query: bool = True  # False: the encoder output is the decoder input (Table 4a)
    target: str = "features"  # or "pixels" (Table 4b)
    score_pool: int = 16  # average-pooling window of the image score, in pixels of a 224-px image (UniAD's choice)
    epochs: int = 500
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_drop_epoch: int = 400  # lr × 0.1 from this epoch on
    batch_size: int = 16  # training batch (paper: 16 on MVTec AD, 128 on CIFAR-10); create(batch_size=) sets it
    features_in_memory_mb: float = 0.0  # frozen training features kept in RAM up to this size, beyond it on disk

    @classmethod
    def for_profile(cls, profile: str = "smoke", **overrides) -> "ADTRConfig":
        from ..profiles import get

        if get(profile).is_smoke:
            base = cls(backbone="efficientnet_lite0", layers=(0, 1, 2, 3), feature_stride=8, dim=64, heads=4,
                       ffn=128, encoder_layers=2, decoder_layers=2, epochs=12, lr=2e-3, lr_drop_epoch=10,
                       batch_size=10, features_in_memory_mb=1024)
        else:
            base = cls()
        return dataclasses.replace(base, **overrides)


# --------------------------------------------------------------------------- embedding

class MultiScaleFeatures(nn.Module):
    """Frozen backbone stages resized to one grid and concatenated: images B×3×H×W → f B×C×h×w."""

    def __init__(self, *, backbone: nn.Module, layers: tuple[int, ...], stride: int):
        super().__init__()
        self.backbone, self.layers, self.stride = backbone, backbones.check_layers(backbone, layers), stride
        self.channels = sum(backbone.channels[i] for i in self.layers)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        feats = self.backbone(x)
        return torch.cat([self._resize(feats[i], size) for i in self.layers], dim=1)

    @staticmethod
    def _resize(f: torch.Tensor, size) -> torch.Tensor:
        """Finer stages are average-pooled down (no aliasing), coarser ones upsampled on their pixel centres."""
        if f.shape[-2] > size[0]:
            return F.adaptive_avg_pool2d(f, size)
        return resize_aligned(f, size)


class PixelPatches(nn.Module):
    """Table 4b: reconstruct raw pixels. Each ``stride×stride`` RGB patch becomes one token: B×(3·s²)×h×w."""

    def __init__(self, *, stride: int):
        super().__init__()
        self.stride, self.channels = stride, 3 * stride * stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.stride)


# --------------------------------------------------------------------------- transformer

class TokenMix(nn.Module):
    """Multi-head attention, or (``attention=False``, Table 4a "w/o Attn") a per-token
    concatenation of query and value followed by a linear projection: no token sees another."""

    def __init__(self, *, dim: int, heads: int, attention: bool):
        super().__init__()
        self.attention = attention
        self.op = nn.MultiheadAttention(dim, heads, batch_first=True) if attention else nn.Linear(2 * dim, dim)

    def forward(self, q, k, v):  # q: B×Nq×D, k, v: B×Nk×D
        if self.attention:
            return self.op(q, k, v, need_weights=False)[0]
        return self.op(torch.cat([q, v], dim=-1))


class FeedForward(nn.Sequential):
    """FC(D→ffn) – ReLU – FC(ffn→D), the paper's appendix table."""

    def __init__(self, *, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class EncoderLayer(nn.Module):
    """Self-attention + FFN, each with a shortcut and post-LayerNorm; position added to q and k in every layer."""

    def __init__(self, *, dim, heads, ffn, attention):
        super().__init__()
        self.mix, self.norm1 = TokenMix(dim=dim, heads=heads, attention=attention), nn.LayerNorm(dim)
        self.ffn, self.norm2 = FeedForward(dim=dim, hidden=ffn), nn.LayerNorm(dim)

    def forward(self, x, pos):  # x, pos: B×N×D
        qk = x + pos
        x = self.norm1(x + self.mix(qk, qk, x))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    """Self-attention over the queries, cross-attention into the encoder output, FFN; position everywhere."""

    def __init__(self, *, dim, heads, ffn, attention):
        super().__init__()
        self.self_mix, self.norm1 = TokenMix(dim=dim, heads=heads, attention=attention), nn.LayerNorm(dim)
        self.cross_mix, self.norm2 = TokenMix(dim=dim, heads=heads, attention=attention), nn.LayerNorm(dim)
        self.ffn, self.norm3 = FeedForward(dim=dim, hidden=ffn), nn.LayerNorm(dim)

    def forward(self, t, memory, pos):  # t: B×N×D decoder tokens, memory: B×N×D encoder output
        q = t + pos
        t = self.norm1(t + self.self_mix(q, q, t))
        t = self.norm2(t + self.cross_mix(t + pos, memory + pos, memory))
        return self.norm3(t + self.ffn(t))


class TransformerReconstructor(nn.Module):
    """Tokens B×N×D → reconstructed tokens B×N×D.

    With ``aux_query`` the decoder starts from a learned query embedding q ∈ R^{N×D}
    (Eq. (5)): to reconstruct f it must attend to f, and q only learns normal patterns.
    Without it the decoder starts from the encoder output, which carries f straight through.
    """

    def __init__(self, *, tokens: int, dim: int, heads: int, ffn: int, encoder_layers: int, decoder_layers: int,
                 attention: bool, aux_query: bool):
        super().__init__()
        kw = dict(dim=dim, heads=heads, ffn=ffn, attention=attention)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)  # learned position embedding
        self.query = nn.Parameter(torch.randn(1, tokens, dim) * 0.02) if aux_query else None
        self.encoder = nn.ModuleList(EncoderLayer(**kw) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(**kw) for _ in range(decoder_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos.expand(x.shape[0], -1, -1)
        memory = x
        for layer in self.encoder:
            memory = layer(memory, pos)
        t = self.query.expand(x.shape[0], -1, -1) if self.query is not None else memory
        for layer in self.decoder:
            t = layer(t, memory, pos)
        return t


class ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU(),
                                  nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim))

    def forward(self, x):
        return F.relu(x + self.body(x))


class CNNReconstructor(nn.Module):
    """Table 4a baseline: ResNet-style residual 3×3 blocks on the reduced feature map."""

    def __init__(self, *, dim: int, blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualBlock(dim) for _ in range(blocks)))

    def forward(self, x):  # B×D×h×w
        return self.blocks(x)


class ADTRModel(nn.Module):
    """Embedding → 1×1 conv (C→D) → reconstructor → 1×1 conv (D→C).

    ``forward(images)`` returns ``(f, f_hat)``, both B×C×h×w: the target and its reconstruction.
    """

    def __init__(self, *, embed: nn.Module, grid: tuple[int, int], config: ADTRConfig):
        super().__init__()
        c, d = embed.channels, config.dim
        # the frozen embedding is used, not owned: it is no submodule, so checkpoints hold only what trains
        object.__setattr__(self, "embed", embed)
        self.grid = grid
        self.reduce, self.expand = nn.Conv2d(c, d, 1), nn.Conv2d(d, c, 1)
        if config.reconstructor == "transformer":
            self.reconstructor = TransformerReconstructor(
                tokens=grid[0] * grid[1], dim=d, heads=config.heads, ffn=config.ffn,
                encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers,
                attention=config.attention, aux_query=config.aux_query)
        elif config.reconstructor == "cnn":
            self.reconstructor = CNNReconstructor(dim=d, blocks=config.encoder_layers + config.decoder_layers)
        else:
            raise ValueError(f"reconstructor must be 'transformer' or 'cnn', got {config.reconstructor!r}")

    def reconstruct(self, f: torch.Tensor) -> torch.Tensor:
        """f B×C×h×w → f̂ B×C×h×w."""
        if tuple(f.shape[-2:]) != tuple(self.grid):
            raise ValueError(f"feature grid {tuple(f.shape[-2:])} differs from the model's {self.grid}: "
                             "train and test with the same image size")
        z = self.reduce(f)  # B×D×h×w
        if isinstance(self.reconstructor, TransformerReconstructor):
            b, d, h, w = z.shape
            tokens = self.reconstructor(z.flatten(2).transpose(1, 2))  # B×(h·w)×D
            z = tokens.transpose(1, 2).reshape(b, d, h, w)
        else:
            z = self.reconstructor(z)
        return self.expand(z)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.embed(images)
        return f, self.reconstruct(f)


# --------------------------------------------------------------------------- anomaly map and score

def feature_difference(f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
    """Eq. (2): d(i, u) = f(i, u) − f̂(i, u), B×C×h×w."""
    return f - f_hat


def anomaly_map(f: torch.Tensor, f_hat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. (3): s(u) = ||d(:, u)||₂, bilinearly upsampled to the input: B×1×H×W."""
    s = feature_difference(f, f_hat).norm(dim=1, keepdim=True)
    return resize_aligned(s, size)


def image_score(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """The maximum of the average-pooled map, B×1×H×W → B."""
    pooled = F.avg_pool2d(maps, pool, stride=1, padding=pool // 2, count_include_pad=False) if pool > 1 else maps
    return pooled.flatten(1).max(dim=1).values


# --------------------------------------------------------------------------- losses

def feature_mse(f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
    """Eq. (1): L_norm = ||f − f̂||²₂ / (H·W), averaged over the batch (the sum runs over channels)."""
    return (f - f_hat).pow(2).sum(dim=1).mean()


def pseudo_huber(d: torch.Tensor) -> torch.Tensor:
    """Eq. (6): φ(u) = sqrt((1/C · Σ_i |d(i,u)|)² + 1) − 1, B×C×h×w → B×h×w."""
    return torch.sqrt(d.abs().mean(dim=1).pow(2) + 1) - 1


def push_pull_loss(phi: torch.Tensor, y: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """Eq. (7), pixel labels y (B×h×w in {0,1}):
    L_px = 1/HW Σ_u (1 − y(u)) φ(u) − α log(1 − exp(−1/HW Σ_u y(u) φ(u))), averaged over the batch.

    The first term pulls normal features to their reconstruction; the second pushes
    anomalous ones away (it vanishes as their φ grows, and is 0 for images without anomalies).
    """
    hw = phi.shape[-1] * phi.shape[-2]
    pull = ((1 - y) * phi).flatten(1).sum(1) / hw
    push_mass = (y * phi).flatten(1).sum(1) / hw
    push = -alpha * torch.log(1 - torch.exp(-push_mass) + eps)
    has_anomaly = (y.flatten(1).sum(1) > 0).float()
    return (pull + has_anomaly * push).mean()


def topk_image_loss(phi: torch.Tensor, y: torch.Tensor, k: int, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """Eq. (8)–(9), image labels y (B in {0,1}): q = mean of the k largest φ(u);
    L_img = (1 − y) q − α y log(1 − exp(−q)), averaged over the batch."""
    q = phi.flatten(1).topk(min(k, phi[0].numel()), dim=1).values.mean(1)
    y = y.float()
    return ((1 - y) * q - alpha * y * torch.log(1 - torch.exp(-q) + eps)).mean()


# --------------------------------------------------------------------------- frozen features, once

class FeatureStore(torch.utils.data.Dataset):
    """The frozen features ``f`` (and per-item labels) of a set of images, computed once and read per batch.

    The backbone is frozen and ADTR augments nothing, so an image's features are the same in every
    epoch: :meth:`ADTRDetector._store` computes them batch by batch in one pass and adds them here.
    Up to ``memory_mb`` they stay in memory; beyond that everything goes to files in a temporary
    folder and each item is read back when a batch asks for it, so memory does not grow with the
    training set. Items are tuples ``(f,)`` or ``(f, y)``, as a ``TensorDataset``'s are.
    """

    def __init__(self, *, memory_mb: float):
        self.memory_mb = memory_mb
        self.parts: list[list[torch.Tensor]] | None = None  # per field, the chunks held in memory
        self.tensors: list[torch.Tensor] | None = None  # per field, all items (in memory, after finish())
        self.shapes: list[tuple[int, ...]] = []  # per field, one item's shape
        self.files: list = []  # per field, an open file (on disk)
        self.folder: tempfile.TemporaryDirectory | None = None
        self.n, self.nbytes = 0, 0
        self.channel_sum: torch.Tensor | None = None  # Σ f over items and positions, float64, C (on disk)

    def add(self, *fields: torch.Tensor) -> None:
        """Append a chunk: ``fields[0]`` features B×C×h×w, then any labels B×… (CPU tensors)."""
        fields = [t.detach().to("cpu", torch.float32).contiguous() for t in fields]
        if self.parts is None:
            self.parts, self.shapes = [[] for _ in fields], [tuple(t.shape[1:]) for t in fields]
        self.n += len(fields[0])
        self.nbytes += sum(t.numel() * 4 for t in fields)
        if not self.files and self.nbytes > self.memory_mb * 2**20:
            self._to_disk()
        if self.files:
            self._sum(fields[0])
            for fh, t in zip(self.files, fields):
                fh.write(t.numpy().tobytes())
        else:
            for part, t in zip(self.parts, fields):
                part.append(t)

    def _to_disk(self) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="uadkit-adtr-features-")
        self.files = [open(Path(self.folder.name) / f"field{j}.f32", "w+b") for j in range(len(self.parts))]
        for part, fh in zip(self.parts, self.files):
            for t in part:
                fh.write(t.numpy().tobytes())
        for f in self.parts[0]:
            self._sum(f)
        self.parts = [[] for _ in self.parts]

    def _sum(self, f: torch.Tensor) -> None:
        s = f.double().sum(dim=(0, 2, 3))  # C
        self.channel_sum = s if self.channel_sum is None else self.channel_sum + s

    def finish(self) -> "FeatureStore":
        """After the last :meth:`add`: ready to be read."""
        if self.parts is None:
            raise ValueError("no features were added")
        if self.files:
            for fh in self.files:
                fh.flush()
        else:
            self.tensors = [torch.cat(part) for part in self.parts]
            self.parts = None
        return self

    @property
    def on_disk(self) -> bool:
        return bool(self.files)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.shapes[0][-2:])

    def mean(self) -> torch.Tensor:
        """The mean feature over all items and positions, C."""
        if self.tensors is not None:
            return self.tensors[0].mean(dim=(0, 2, 3))
        h, w = self.grid
        return (self.channel_sum / (self.n * h * w)).float()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.tensors is not None:
            return tuple(t[i] for t in self.tensors)
        out = []
        for fh, shape in zip(self.files, self.shapes):
            count = int(np.prod(shape, dtype=np.int64))
            buf = np.empty(count, dtype=np.float32)
            fh.seek(int(i) * count * 4)
            fh.readinto(memoryview(buf).cast("B"))
            out.append(torch.from_numpy(buf).view(shape))
        return tuple(out)

    def close(self) -> None:
        for fh in self.files:
            fh.close()
        self.files, self.tensors, self.parts = [], None, None
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _chunks(stream, size: int):
    """Re-cut a stream of tuples of tensors (equal first dimension) into chunks of ``size`` rows, the
    last one shorter: the same chunks as cutting the concatenation of the whole stream."""
    held, count = [], 0
    for part in stream:
        held.append(part)
        count += len(part[0])
        while count >= size:
            joined = [torch.cat(ts) for ts in zip(*held)]
            yield tuple(t[:size] for t in joined)
            rest = tuple(t[size:] for t in joined)
            count -= size
            held = [rest] if count else []
    if count:
        yield tuple(torch.cat(ts) for ts in zip(*held))


def _image_batches(source, batch_size: int, *, with_masks: bool = False):
    """Batches ``(images B×3×H×W,)`` or ``(images, masks B×1×H×W)`` of any image source the detector accepts:
    a tensor N×3×H×W, a pair of tensors (images, masks), a DataLoader of item dicts, a dataset of item
    dicts, or any iterable of item dicts (e.g. anomalies synthesised as they are read)."""
    if isinstance(source, torch.Tensor):
        source = (source,)
    if isinstance(source, (tuple, list)) and source and all(isinstance(t, torch.Tensor) for t in source):
        images = source[0]
        masks = source[1] if len(source) > 1 else None
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            if with_masks:
                m = masks[i:i + batch_size] if masks is not None else torch.zeros(len(x), 1, *x.shape[-2:])
                yield x, m
            else:
                yield (x,)
        return
    if isinstance(source, torch.utils.data.DataLoader):
        batches = iter(source)
    elif isinstance(source, torch.utils.data.Dataset) and hasattr(source, "__len__"):
        batches = iter(loader(source, batch_size=batch_size))
    else:  # an iterable of item dicts
        def grouped():
            group = []
            for item in source:
                group.append(item)
                if len(group) == batch_size:
                    yield {k: torch.stack([it[k] for it in group]) for k in ("image", "mask") if k in group[0]}
                    group = []
            if group:
                yield {k: torch.stack([it[k] for it in group]) for k in ("image", "mask") if k in group[0]}
        batches = grouped()
    for batch in batches:
        x = batch["image"]
        if with_masks:
            m = batch.get("mask")
            yield x, (m if m is not None else torch.zeros(len(x), 1, *x.shape[-2:]))
        else:
            yield (x,)


# --------------------------------------------------------------------------- the detector interface

class ADTRDetector(Detector):
    """ADTR behind the book's interface: ``fit`` trains the reconstructor on normal images
    (Eq. (1)); ``finetune`` adapts it to anomalies (ADTR+, Eq. (7) or Eq. (9)).

    The frozen features of the training images are computed once per training, in batches, and
    read back per training batch (:class:`FeatureStore`); ``create("adtr", batch_size=...)`` sets
    the training batch (``config.batch_size``) as well as the batch of feature extraction and prediction.
    """

    name = "adtr"
    batch_size_trains = True  # uadkit.models.create(batch_size=) sets config.batch_size too

    def __init__(self, config: ADTRConfig | None = None, *, pretrained: bool = True, **kw):
        super().__init__(**kw)
        self.config = c = config or ADTRConfig()
        if c.target == "pixels":
            self.embed = PixelPatches(stride=c.feature_stride)
        elif c.target == "features":
            net = backbones.shared(c.backbone, pretrained=pretrained, device=self.device)
            self.embed = MultiScaleFeatures(backbone=net, layers=c.layers, stride=c.feature_stride)
        else:
            raise ValueError(f"target must be 'features' or 'pixels', got {c.target!r}")
        self.embed.to(self.device)
        self.model: ADTRModel | None = None
        self.history: list[float] = []

    def __deepcopy__(self, memo):
        """A copy with its own reconstructor that shares the frozen embedding (and its backbone)."""
        memo[id(self.embed)] = self.embed
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo))
        if new.model is not None:
            object.__setattr__(new.model, "embed", self.embed)
        return new

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen embeddings f of images N×3×H×W, computed in batches: N×C×h×w on the CPU."""
        return torch.cat([self.embed(images[i:i + self.batch_size].to(self.device)).cpu()
                          for i in range(0, len(images), self.batch_size)])

    @torch.no_grad()
    def _store(self, stream, *, label=None) -> FeatureStore:
        """Features of every image of ``stream`` (tuples ``(images,)`` or ``(images, y_source)``), computed in
        chunks of ``batch_size`` and added to a :class:`FeatureStore`, with ``label(chunk)`` as a second field."""
        store = FeatureStore(memory_mb=self.config.features_in_memory_mb)
        try:
            for chunk in _chunks(stream, self.batch_size):
                f = self.embed(chunk[0].to(self.device))  # B×C×h×w
                store.add(f, *([] if label is None else [label(chunk, f.shape[-2:])]))
            return store.finish()
        except BaseException:
            store.close()
            raise

    def _train(self, store: FeatureStore, loss_fn, *, epochs: int, lr: float, drop: int, checkpoint, desc: str):
        """AdamW on the reconstructor over the stored features (the backbone is frozen)."""
        data = torch.utils.data.DataLoader(store, batch_size=self.config.batch_size, shuffle=True,
                                           generator=torch.Generator().manual_seed(self.seed))
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.config.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[drop], gamma=0.1)
        return train.fit(self.model, loss_fn, data, epochs=epochs, optimizer=opt, scheduler=sched,
                         device=self.device, checkpoint=checkpoint, desc=desc, progress=self.progress)

    def _fit(self, train_loader, checkpoint=None) -> None:
        torch.manual_seed(self.seed)
        with self._store(_image_batches(train_loader, self.batch_size)) as store:
            self.model = ADTRModel(embed=self.embed, grid=store.grid, config=self.config).to(self.device)
            with torch.no_grad():  # start from the mean feature rather than from 0 (features are large; see notes)
                self.model.expand.bias.copy_(store.mean())
            c = self.config
            self.history = self._train(store, lambda m, b: feature_mse(b[0], m.reconstruct(b[0])), epochs=c.epochs,
                                       lr=c.lr, drop=c.lr_drop_epoch, checkpoint=checkpoint, desc="ADTR")

    def finetune(self, normal, anomalies, *, labels: str, epochs: int, alpha: float = 0.003, k: int = 20,
                 lr: float | None = None, lr_drop_epoch: int | None = None, checkpoint=None) -> list[float]:
        """ADTR+: continue training with anomalies.

        The learning rate drops ×0.1 at ``lr_drop_epoch`` (default: two thirds of ``epochs``, the
        paper's epoch 200 of 300).

        ``normal``: the normal training images, a dataset of item dicts or a tensor N×3×H×W.
        ``labels="pixel"``: ``anomalies`` has images and masks, e.g. confetti noise on normal images:
        a pair of tensors ``(images, masks)``, a dataset, or an iterable of item dicts ``{"image", "mask"}``
        (read once, in order, so anomalies may be synthesised as they are read); loss Eq. (7) with
        y(u) = 1 where at least a quarter of a feature cell is anomalous.
        ``labels="image"``: ``anomalies`` are anomalous images (another class or category: a tensor, a
        dataset or an iterable of item dicts); loss Eq. (9) on the top-``k`` mean of φ.
        ``labels="none"``: the control, more epochs of Eq. (1) on ``normal`` alone (``anomalies`` unused).
        """
        if self.model is None:
            raise RuntimeError("finetune() continues a fitted model: call fit() first")
        bs = self.batch_size
        if labels == "pixel":
            stream = _chain(_image_batches(normal, bs, with_masks=True), _image_batches(anomalies, bs, with_masks=True))
            grid = self.model.grid
            label = lambda chunk, _: F.adaptive_avg_pool2d(chunk[1], grid)[:, 0].ge(0.25).float()  # noqa: E731  N×h×w
            loss = lambda m, b: push_pull_loss(pseudo_huber(feature_difference(b[0], m.reconstruct(b[0]))), b[1], alpha)  # noqa: E731
        elif labels == "image":
            stream = _chain(_labelled(_image_batches(normal, bs), 0.0), _labelled(_image_batches(anomalies, bs), 1.0))
            label = lambda chunk, _: chunk[1]  # noqa: E731
            loss = lambda m, b: topk_image_loss(pseudo_huber(feature_difference(b[0], m.reconstruct(b[0]))), b[1], k, alpha)  # noqa: E731
        elif labels == "none":
            stream, label = _labelled(_image_batches(normal, bs), 0.0), (lambda chunk, _: chunk[1])
            loss = lambda m, b: feature_mse(b[0], m.reconstruct(b[0]))  # noqa: E731
        else:
            raise ValueError(f"labels must be 'pixel', 'image' or 'none', got {labels!r}")
        lr, drop = lr or self.config.lr, lr_drop_epoch or max(1, round(epochs * 2 / 3))
        settings = {"method": "adtr+", "config": dataclasses.asdict(self.config), "labels": labels, "epochs": epochs,
                    "alpha": alpha, "k": k, "lr": lr, "lr_drop_epoch": drop, "batch_size": self.batch_size,
                    "seed": self.seed, "dry_run": dryrun.active()}
        with self._store(stream, label=label) as store, train.fingerprint({**settings, "n_train": len(store)}):
            history = self._train(store, loss, epochs=epochs, lr=lr, drop=drop, checkpoint=checkpoint,
                                  desc=f"ADTR+ ({labels} labels)")
        self.history += history
        return history

    def _predict_batch(self, images):
        f, f_hat = self.model(images)
        maps = anomaly_map(f, f_hat, images.shape[-2:])
        pool = max(1, round(self.config.score_pool * images.shape[-1] / 224))  # scaled to this image size
        return image_score(maps, pool + 1 - pool % 2), maps  # an odd window stays centred

    @torch.no_grad()
    def difference_vectors(self, images) -> torch.Tensor:
        """d(:, u) of Eq. (2) for every cell of ``images`` (a tensor N×3×H×W or a dataset), computed in
        batches: N×C×h×w on the CPU (for the t-SNE of Fig. 5; pass a subset of a large test set)."""
        out = []
        for (x,) in _image_batches(images, self.batch_size):
            f = self.embed(x.to(self.device))
            out.append(feature_difference(f, self.model.reconstruct(f)).cpu())
        return torch.cat(out)


def _chain(*streams):
    for stream in streams:
        yield from stream


def _labelled(batches, value: float):
    """``(images,)`` batches → ``(images, y)`` with image label y = ``value`` for every image."""
    for (x,) in batches:
        yield x, torch.full((len(x),), value)
