"""MDD-Net: Memory-augmented Dual-Decoder Networks for multi-class anomaly detection (Xing et al.).

One model for all categories. It starts from reverse distillation (RD4AD): a frozen
teacher T turns an image into multi-scale features, a trainable *neck* squeezes them
into one bottleneck, and a *student decoder* must rebuild the teacher's features from
it; the cosine distance between the two, per scale, is the anomaly map. MDD-Net adds

* a **restoration decoder** R that, fed the teacher features of a *synthetically
  corrupted* image, must output the features of the clean image (anomalies removed),
* an **identity decoder** I that reconstructs the corrupted features as they are,
* a **class-aware memory module** (CMM) between teacher and neck on the restoration
  path: learnable normal prototypes read by attention, with a classification loss
  that makes the items class-discriminative.

    torch_model  : MDDNet                      images → teacher, restoration and identity features
                   ClassAwareMemory            CMM: attention read over learnable items, class logits
                   Neck, Decoder               RD4AD's bottleneck and mirrored student decoder
    anomaly_map  : cosine_map                  1 − cos per location and scale, upsampled and summed
                   fused_map                   restoration signal + λ_f · decoder-discrepancy signal
                   select_fusion_weight        λ_f chosen on validation anomalies, never on test labels
    loss         : cosine_loss                 L_rec, L_restoration, L_identity
                   class_loss                  L_cls
                   discrepancy_loss            L_dist, supervised by the synthetic mask
                   mdd_losses                  the five training steps of the paper's Figure 2
    training     : TrainingPairs, FreshDraws   step 2: a fresh Perlin anomaly of every image each time it is
                                               drawn, filled with an image of another class read from the dataset
                   training_loss               one batch: teacher features of both versions, the losses
                   VectorSample                a reservoir of feature vectors that starts the memory items
    analysis     : item_class_distribution,    the class distribution of every memory item and its
                   entropy                     entropy (the paper's Figure 5)

The paper text we have is a summary without equations or code; every choice it leaves
open is listed in the chapter's reimplementation notes. Training reads the images one batch at a
time (teacher features, synthetic anomalies and all), so memory does not grow with the dataset:
only the category of every image, a fixed-size sample of feature vectors for the memory items and a
fixed number of validation images for λ_f are kept. Ablation switches (config):
``dual=False`` (one decoder trained on normal images: plain RD4AD), ``memory=False``,
``cls_weight=0`` (memory without class loss), and ``signal`` ("fused", "restoration",
"discrepancy") choosing the inference map.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset

from .. import backbones, synth, train
from ..backbones import resize_aligned
from ..data.base import collate, loader
from .base import Detector

__all__ = [
    "step_cost", "MDDConfig", "ClassAwareMemory", "Neck", "Decoder", "MDDNet",
    "cosine_distance", "cosine_map", "fused_map", "select_fusion_weight", "image_score",
    "cosine_loss", "class_loss", "discrepancy_loss", "mdd_losses", "training_loss", "VectorSample", "teacher_features",
    "TrainingPairs", "FreshDraws", "item_categories", "item_class_distribution", "entropy", "MDDNetDetector",
]


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class MDDConfig:
    """MDD-Net's settings; ``MDDConfig.for_profile("paper")`` gives the paper's (as far as it states them)."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)  # teacher stages read: WRN50 layer1–3 (RD4AD), strides 4, 8, 16
    dim: int = 256  # width of the neck and decoder blocks
    neck_stride: int = 2  # RD4AD's bottleneck halves the coarsest teacher grid once more
    dual: bool = True  # False: one decoder trained on normal images only (plain RD4AD)
    memory: bool = True  # the class-aware memory module on the restoration path
    memory_items: int = 200  # items per teacher scale
    temperature: float = 0.05  # softmax temperature of the cosine addressing
    cls_weight: float = 1.0  # weight of L_cls (0: memory without class loss)
    dist_weight: float = 1.0  # weight of L_dist
    dist_margin: float = 0.5  # cosine-distance margin L_dist asks for inside the synthetic mask
    dist_detach_identity: bool = False  # True: L_dist moves the restoration path only (I's output detached)
    shared_neck: bool = True  # False: the identity path has its own neck
    signal: str = "fused"  # inference map: "fused", "restoration" or "discrepancy"
    fusion_weight: float | None = None  # s = s_res + λ_f · s_dis; None: λ_f chosen after training
    fusion_grid: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)  # the λ_f candidates of that choice
    synth_source: str = "other_class"  # Perlin fill: "other_class" (an image of another category) or "self"
    init_images: int = 256  # training images (drawn at random) whose feature vectors seed the memory items
    fusion_images: int = 256  # training images (drawn at random) that get the CutPaste anomalies choosing λ_f
    smooth_sigma: float = 4.0  # Gaussian smoothing of the map, in pixels of a 256-px image (RD4AD)
    epochs: int = 200
    lr: float = 5e-3
    cosine_lr: bool = False  # True: the learning rate decays to 0 on a cosine over the epochs
    batch_size: int = 16

    @classmethod
    def for_profile(cls, profile: str = "smoke", **overrides) -> "MDDConfig":
        from ..profiles import get

        if get(profile).is_smoke:
            base = cls(backbone="efficientnet_lite0", layers=(1, 2, 3), dim=32, neck_stride=1, memory_items=48,
                       epochs=8, lr=3e-3, cosine_lr=True, batch_size=16)
        else:
            base = cls()
        return dataclasses.replace(base, **overrides)


# --------------------------------------------------------------------------- torch model

def conv_bn(c_in: int, c_out: int, *, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class ClassAwareMemory(nn.Module):
    """CMM at one teacher scale: ``items`` learnable prototypes m_j ∈ R^C.

    Addressing (cosine attention): w_u = softmax_j(cos(z_u, m_j) / τ) for every location u;
    read: ẑ_u = Σ_j w_uj m_j, which *replaces* z_u, so whatever reaches the neck is a mix
    of stored normal patterns.

    Class prediction for L_cls: every item carries a learnable class distribution
    q_j = softmax(a_j) over the C categories, and an image's class posterior is the mix of the
    distributions of the items it reads, p(c | x) = Σ_j w̄_j q_jc with w̄ = mean_u w_u.
    Cross-entropy on p is lowest when the images of a class read only items whose q puts its
    mass on that class, so the loss itself makes the items class-specific (a free linear
    classifier on w̄ could predict the class from any class-dependent addressing instead).
    """

    def __init__(self, *, channels: int, items: int, classes: int, temperature: float):
        super().__init__()
        self.items = nn.Parameter(torch.randn(items, channels) * 0.1)  # N×C, in units of `scale`
        self.register_buffer("scale", torch.ones(()))  # RMS of the teacher features (set by init_from)
        self.item_class_logits = nn.Parameter(torch.zeros(items, classes))  # a_j, N×classes
        self.temperature = temperature

    @torch.no_grad()
    def init_from(self, feats, generator: torch.Generator) -> None:
        """Start the items at feature vectors drawn uniformly at random (faster than noise) from ``feats``:
        one B×C×h×w tensor, or an iterable of them read one at a time (see :class:`VectorSample`)."""
        sample = VectorSample(len(self.items), generator)
        for f in [feats] if isinstance(feats, torch.Tensor) else feats:
            sample.add(f)
        self.load_sample(sample)

    @torch.no_grad()
    def load_sample(self, sample: "VectorSample") -> None:
        """Items ← the sampled vectors, in units of the sampled features' RMS.

        The items are stored divided by the features' RMS and multiplied back on reading: teacher
        features can be large (EfficientNet's are ~10), and an optimiser step of size lr on items of
        that size would barely move them; in RMS units every teacher's items learn at the same pace."""
        self.scale.fill_(max(sample.rms, 1e-6))
        vectors = sample.vectors
        self.items[:len(vectors)] = (vectors.to(self.items.device) / self.scale).to(self.items)

    def address(self, z: torch.Tensor) -> torch.Tensor:
        """z B×C×h×w → attention weights B×h×w×N (each row sums to 1)."""
        zn = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # B×h×w×C
        return torch.softmax(zn @ F.normalize(self.items, dim=-1).T / self.temperature, dim=-1)

    def class_logits(self, w: torch.Tensor) -> torch.Tensor:
        """Address weights B×h×w×N → log p(c | x), B×classes (normalised log-probabilities, usable as logits)."""
        w_mean = w.mean(dim=(1, 2))  # B×N
        return torch.log((w_mean @ torch.softmax(self.item_class_logits, dim=-1)).clamp(min=1e-12))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z B×C×h×w → (read B×C×h×w, weights B×h×w×N, class logits B×classes)."""
        w = self.address(z)
        read = (w @ self.items).permute(0, 3, 1, 2) * self.scale
        return read, w, self.class_logits(w)


class VectorSample:
    """A uniform random sample of ``k`` feature vectors from a stream of B×C×h×w feature maps, in O(k)
    memory, and the RMS of the whole stream.

    Reservoir sampling with random keys: every vector gets a key u ~ U(0, 1), and the ``k`` vectors of
    largest key are kept, a sample without replacement of the vectors seen so far. Keys come from the
    CPU ``generator``; only the kept vectors leave the features' device (as fp32 on the CPU)."""

    def __init__(self, k: int, generator: torch.Generator):
        self.k, self.generator = k, generator
        self.keys = torch.empty(0)
        self.vectors = torch.empty(0, 0)
        self.sum_sq, self.count = 0.0, 0

    @torch.no_grad()
    def add(self, feats: torch.Tensor) -> None:
        v = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # (B·h·w)×C, on the features' device
        self.sum_sq += v.float().pow(2).sum().item()
        self.count += v.numel()
        n_old = len(self.keys)
        keys = torch.cat([self.keys, torch.rand(len(v), generator=self.generator)])
        top = keys.topk(min(self.k, len(keys))).indices
        old, new = top[top < n_old], top[top >= n_old] - n_old
        picked = v[new.to(v.device)].float().cpu()
        self.vectors = torch.cat([self.vectors[old], picked]) if n_old else picked
        self.keys = torch.cat([self.keys[old], keys[n_old + new]])

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_sq / max(self.count, 1))


class Neck(nn.Module):
    """RD4AD's one-class bottleneck: every teacher scale is brought to the coarsest grid by
    stride-2 convolutions, the scales are concatenated, fused by a 1×1 conv and a 3×3 conv
    of stride ``neck_stride``: list of B×C_k×h_k×w_k → B×D×h×w."""

    def __init__(self, *, channels: list[int], strides: list[int], dim: int, neck_stride: int):
        super().__init__()
        top = max(strides)
        self.down = nn.ModuleList(
            nn.Sequential(*[conv_bn(c if i == 0 else dim, dim, stride=2) for i in range(int(math.log2(top // s)))])
            if s < top else conv_bn(c, dim) for c, s in zip(channels, strides))
        self.fuse = nn.Sequential(nn.Conv2d(dim * len(channels), dim, 1, bias=False), nn.BatchNorm2d(dim),
                                  nn.ReLU(inplace=True), conv_bn(dim, dim, stride=neck_stride))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.fuse(torch.cat([down(f) for down, f in zip(self.down, feats)], dim=1))


class Decoder(nn.Module):
    """The student: mirrors the teacher from the bottleneck up, B×D×h×w → list of B×C_k×h_k×w_k
    in the teacher's order (fine to coarse). Each stage: ×2 transposed conv (where the grid
    grows), two 3×3 conv blocks, a 1×1 head to the teacher's width C_k."""

    def __init__(self, *, channels: list[int], dim: int, neck_stride: int):
        super().__init__()
        n = len(channels)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(dim, dim, 2, stride=2) if (k < n - 1 or neck_stride > 1) else nn.Identity()
            for k in range(n))  # up[k] leads into scale k; scale n−1 (coarsest) is the bottleneck's own grid
        self.blocks = nn.ModuleList(nn.Sequential(conv_bn(dim, dim), conv_bn(dim, dim)) for _ in range(n))
        self.heads = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in channels)

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in reversed(range(len(self.heads))):  # coarse → fine
            z = self.blocks[k](self.up[k](z))
            outs.append(self.heads[k](z))
        return outs[::-1]


class _LastStageDone(Exception):
    """Raised by a forward hook to end the teacher's forward pass after the last stage that is read."""


def teacher_features(teacher: nn.Module, images: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """The teacher's feature maps at stage indices ``layers``, B×3×H×W → list of B×C_k×h_k×w_k, without
    computing the stages after the last one read (WRN50's layer4, EfficientNet's stride-32 blocks): forward
    hooks on the stages' modules (timm's ``feature_info``) collect their outputs and stop the pass there.
    A network without ``feature_info`` runs whole. The hooks live for one call only (the teacher is shared)."""
    info = getattr(getattr(teacher, "model", None), "feature_info", None)
    if info is None:
        feats = teacher(images)
        return [feats[i] for i in layers]
    modules, names, last, outs = dict(teacher.model.named_modules()), info.module_name(), max(layers), {}

    def keep(k):
        def hook(module, args, out):
            outs[k] = out
            if k == last:
                raise _LastStageDone
        return hook

    handles = [modules[names[k]].register_forward_hook(keep(k)) for k in set(layers)]
    try:
        teacher(images)
    except _LastStageDone:
        pass
    finally:
        for h in handles:
            h.remove()
    return [outs[k] for k in layers]


class MDDNet(nn.Module):
    """Frozen teacher, optional CMM, shared neck, restoration decoder R and (``dual``) identity decoder I.

    restoration path : T(x) → CMM → neck → R      (the RD4AD student when ``dual=False``)
    identity path    : T(x) → neck → I            (no memory: it must keep anomalies as they are)
    """

    def __init__(self, *, teacher: nn.Module, config: MDDConfig, classes: int):
        super().__init__()
        self._teacher = [teacher]  # frozen and shared between models: kept out of the module tree and state dict
        self.config = config
        self.channels = [teacher.channels[i] for i in backbones.check_layers(teacher, config.layers)]
        strides = [teacher.strides[i] for i in config.layers]
        self.memory = nn.ModuleList(
            ClassAwareMemory(channels=c, items=config.memory_items, classes=classes, temperature=config.temperature)
            for c in self.channels) if config.memory else None
        self.neck = Neck(channels=self.channels, strides=strides, dim=config.dim, neck_stride=config.neck_stride)
        kw = dict(channels=self.channels, dim=config.dim, neck_stride=config.neck_stride)
        self.restoration = Decoder(**kw)
        self.identity = Decoder(**kw) if config.dual else None
        self.identity_neck = (Neck(channels=self.channels, strides=strides, dim=config.dim,
                                   neck_stride=config.neck_stride) if config.dual and not config.shared_neck else None)

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher T. Not a submodule: ``.to()``, ``state_dict()`` and checkpoints leave it alone,
        so that several models (the rows of an ablation) can read one copy (``backbones.shared``)."""
        return self._teacher[0]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Teacher features at the configured scales, B×3×H×W → list of B×C_k×h_k×w_k."""
        return teacher_features(self.teacher, images, self.config.layers)

    def read_memory(self, feats: list[torch.Tensor]):
        """CMM on every scale: (read features, weights per scale, class logits per scale); identity without memory."""
        if self.memory is None:
            return feats, [], []
        out = [mem(f) for mem, f in zip(self.memory, feats)]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]

    def restore(self, feats: list[torch.Tensor]):
        """Restoration path: features → (R's features, class logits per scale)."""
        read, _, logits = self.read_memory(feats)
        return self.restoration(self.neck(read)), logits

    def reproduce(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Identity path: features → I's features (the neck is shared, the decoder is not)."""
        if self.identity is None:
            raise RuntimeError("this MDDNet has one decoder (dual=False): no identity path")
        return self.identity((self.identity_neck or self.neck)(feats))

    def forward(self, images: torch.Tensor) -> dict:
        t = self.encode(images)
        r, logits = self.restore(t)
        return {"teacher": t, "restoration": r, "identity": self.reproduce(t) if self.identity is not None else None,
                "logits": logits}


# --------------------------------------------------------------------------- anomaly map and score

def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 − cos(a_u, b_u) over channels at every location: B×C×h×w → B×1×h×w, in [0, 2]."""
    return 1 - F.cosine_similarity(a, b, dim=1).unsqueeze(1)


def cosine_map(a: list[torch.Tensor], b: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """RD4AD's map: Σ_k up(1 − cos(a^k, b^k)), each scale upsampled to the input size: B×1×H×W."""
    return sum(resize_aligned(cosine_distance(x, y), size) for x, y in zip(a, b))


def fused_map(out: dict, size: tuple[int, int], *, signal: str = "fused", weight: float = 1.0) -> torch.Tensor:
    """The two discrepancy signals of MDD-Net and their fusion, B×1×H×W:
    s_res = Σ_k (1 − cos(T^k, R^k)) (teacher vs restoration decoder),
    s_dis = Σ_k (1 − cos(R^k, I^k)) (restoration vs identity decoder),
    s = s_res + weight · s_dis."""
    if signal not in ("fused", "restoration", "discrepancy"):
        raise ValueError(f"signal must be 'fused', 'restoration' or 'discrepancy', got {signal!r}")
    s = 0
    if signal in ("fused", "restoration"):
        s = s + cosine_map(out["teacher"], out["restoration"], size)
    if signal in ("fused", "discrepancy"):
        if out["identity"] is None:
            raise ValueError("the discrepancy signal needs the identity decoder (dual=True)")
        s = s + (weight if signal == "fused" else 1.0) * cosine_map(out["restoration"], out["identity"], size)
    return s


def select_fusion_weight(s_res: torch.Tensor, s_dis: torch.Tensor, masks: torch.Tensor,
                         grid: tuple[float, ...]) -> tuple[float, dict[float, float]]:
    """Choose λ_f for s = s_res + λ_f · s_dis without test labels: the λ in ``grid`` whose fused maps
    (B×1×H×W, already smoothed) give the highest pixel AUROC against ``masks`` of *validation*
    anomalies (the detector makes them with CutPaste, a kind it was not trained on).
    Returns (λ_f, {λ: AUROC}); on ties the smaller λ wins."""
    from ..metrics import pixel_auroc

    curve = {lam: pixel_auroc(s_res + lam * s_dis, masks) for lam in grid}
    return max(curve, key=lambda lam: (round(curve[lam], 6), -lam)), curve


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of B×1×H×W maps (RD4AD smooths with σ = 4 at 256 px)."""
    if sigma <= 0:
        return maps
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    maps = F.conv2d(F.pad(maps, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def image_score(maps: torch.Tensor) -> torch.Tensor:
    """The maximum of the (smoothed) map, B×1×H×W → B."""
    return maps.flatten(1).max(dim=1).values


# --------------------------------------------------------------------------- losses

def cosine_loss(target: list[torch.Tensor], pred: list[torch.Tensor]) -> torch.Tensor:
    """RD4AD's loss, used for L_rec, L_restoration and L_identity: Σ_k mean_u (1 − cos(t^k_u, p^k_u))."""
    return sum(cosine_distance(t, p).mean() for t, p in zip(target, pred))


def class_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """L_cls: cross-entropy of every scale's memory class logits against the image's category."""
    if not logits:
        return labels.new_zeros((), dtype=torch.float32)
    return sum(F.cross_entropy(lg, labels) for lg in logits) / len(logits)


def discrepancy_loss(restored: list[torch.Tensor], identity: list[torch.Tensor], mask: torch.Tensor,
                     margin: float) -> torch.Tensor:
    """L_dist, supervised by the synthetic mask M (B×1×H×W): at every scale, with m = M average-pooled to
    the scale's grid and d = 1 − cos(R, I),
        Σ_k [ Σ_u (1 − m_u) d_u / Σ_u (1 − m_u)  +  Σ_u m_u · max(0, margin − d_u) / Σ_u m_u ]:
    the decoders agree on normal locations and disagree by at least ``margin`` inside the anomaly."""
    total = 0
    for r, i in zip(restored, identity):
        d = cosine_distance(r, i)
        m = F.adaptive_avg_pool2d(mask, d.shape[-2:])
        normal = ((1 - m) * d).sum() / (1 - m).sum().clamp(min=1e-6)
        anomalous = (m * F.relu(margin - d)).sum() / m.sum().clamp(min=1e-6)
        total = total + normal + anomalous
    return total


def mdd_losses(model: MDDNet, normal: list[torch.Tensor], labels: torch.Tensor, anomalous: list[torch.Tensor] | None,
               mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The five steps of Figure 2, on the teacher features of a batch (see :func:`training_loss`).

    1. normality reconstruction: T(x) → CMM → neck → R;  L_rec = cos loss(T(x), R), L_cls on the memory
    2–3. anomaly synthesis and feature extraction: ``anomalous`` = T(x̃), ``mask`` = M
    4. restoration: T(x̃) → CMM → neck → R;  L_restoration = cos loss(T(x), R(x̃))
    5. identity:    T(x̃) → neck → I;        L_identity = cos loss(T(x̃), I(x̃)),  L_dist(R(x̃), I(x̃), M)
    With ``dual=False`` only step 1 runs (plain RD4AD, plus the memory if it is on).
    """
    c = model.config
    rec, logits = model.restore(normal)
    out = {"rec": cosine_loss(normal, rec), "cls": class_loss(logits, labels)}
    if c.dual:
        restored, logits_a = model.restore(anomalous)
        identity = model.reproduce(anomalous)
        out["restoration"] = cosine_loss(normal, restored)
        out["identity"] = cosine_loss(anomalous, identity)
        target = [f.detach() for f in identity] if c.dist_detach_identity else identity
        out["dist"] = discrepancy_loss(restored, target, mask, c.dist_margin)
    out["total"] = (out["rec"] + c.cls_weight * out["cls"] + out.get("restoration", 0) + out.get("identity", 0)
                    + c.dist_weight * out.get("dist", 0))
    return out


def training_loss(model: MDDNet, batch: dict) -> dict[str, torch.Tensor]:
    """The losses of one batch of :class:`TrainingPairs` items: ``image`` B×3×H×W, ``class`` B and, with
    ``dual``, ``anomalous`` B×3×H×W and ``mask`` B×1×H×W. The frozen teacher runs here, on the normal
    images and their synthetic anomalies in one pass of 2B images (steps 1 and 3 of Figure 2)."""
    x = batch["image"]
    if not model.config.dual:
        return mdd_losses(model, model.encode(x), batch["class"], None, None)
    t = model.encode(torch.cat([x, batch["anomalous"]]))
    normal, anomalous = [f[:len(x)] for f in t], [f[len(x):] for f in t]
    return mdd_losses(model, normal, batch["class"], anomalous, batch["mask"])


# --------------------------------------------------------------------------- training data (step 2)

def item_categories(dataset) -> list[str]:
    """The ``category`` of every item of ``dataset``, read from its records where it has them (file-backed
    and in-memory sets, and concatenations of them), so that no image is loaded."""
    if isinstance(dataset, ConcatDataset):
        return [c for part in dataset.datasets for c in item_categories(part)]
    if isinstance(dataset, Subset):
        cats = item_categories(dataset.dataset)
        return [cats[i] for i in dataset.indices]
    if hasattr(dataset, "records"):
        return [r.category for r in dataset.records]
    if isinstance(getattr(dataset, "categories", None), list) and len(dataset.categories) == len(dataset):
        return list(dataset.categories)
    return [dataset[i]["category"] for i in range(len(dataset))]


class TrainingPairs(Dataset):
    """MDD-Net's training items, read from ``dataset`` one at a time (nothing is kept but every image's class).

    Item ``(i, seed)``: {"image": image i, "class": its index in ``classes``} and, with ``dual``, a fresh
    DRAEM-style anomaly of it drawn with ``seed`` (step 2 of Figure 2): a thresholded Perlin mask M whose
    region is filled with a foreign texture (``synth.perlin_anomaly``), {"anomalous": x̃, "mask": M}.
    DRAEM takes the texture from DTD; ``source="other_class"``: a training image of another category,
    drawn uniformly from ``dataset`` (in the multi-class setting the other classes are foreign textures
    at hand); ``"self"``: the image's own shuffled, recoloured tiles (also used when there is one class).
    With :class:`FreshDraws` every epoch draws new seeds, so an image gets a new anomaly each time."""

    def __init__(self, dataset, classes: list[str], *, dual: bool = True, source: str = "other_class",
                 categories: list[str] | None = None):
        if source not in ("other_class", "self"):
            raise ValueError(f"synth_source must be 'other_class' or 'self', got {source!r}")
        self.dataset, self.dual, self.source = dataset, dual, source
        cats = item_categories(dataset) if categories is None else categories
        self.labels = torch.tensor([classes.index(c) for c in cats])  # N class indices
        self.others = [torch.nonzero(self.labels != k).flatten() for k in range(len(classes))]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> dict:
        i, seed = key if isinstance(key, tuple) else (key, key)
        x, y = self.dataset[i]["image"], int(self.labels[i])
        out = {"image": x, "class": y}
        if self.dual:
            g = torch.Generator().manual_seed(int(seed))
            others, fill = self.others[y], None
            if self.source == "other_class" and len(others):
                fill = self.dataset[int(others[torch.randint(len(others), (1,), generator=g)])]["image"]
            out["anomalous"], out["mask"] = synth.perlin_anomaly(x, fill, generator=g)
        return out


class FreshDraws(Sampler):
    """Every epoch a permutation of the N items, each with a new synthesis seed: keys ``(i, seed)`` of
    :class:`TrainingPairs`. Both are drawn from ``generator``, which ``train.fit`` stores in its
    checkpoints, so a resumed run draws what an uninterrupted one would (with any number of workers)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(2 ** 62, (self.n,), generator=self.generator).tolist()
        return iter(zip(order, seeds))


# --------------------------------------------------------------------------- memory analysis (Figure 5)

@torch.no_grad()
def item_class_distribution(weights: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """The class distribution of every memory item, N_items×classes.

    ``weights`` B×h×w×N are the address weights w_uj of B images, ``labels`` their classes.
    a_cj = mean over the images x of class c of Σ_u w_uj(x)  (the attention mass item j gets
    from an average image of class c), then p(c | j) = a_cj / Σ_c' a_c'j. Averaging per class
    first keeps a class with more images from looking more probable.
    """
    mass = weights.flatten(1, 2).sum(1)  # B×N
    per_class = torch.stack([mass[labels == k].mean(0) if (labels == k).any() else torch.zeros_like(mass[0])
                             for k in range(classes)])  # classes×N
    return (per_class / per_class.sum(0, keepdim=True).clamp(min=1e-12)).T


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats along the last axis: H(p) = −Σ_c p_c log p_c (0 log 0 = 0); 0 ≤ H ≤ log C."""
    return -(p * torch.log(p.clamp(min=1e-30))).sum(-1)


# --------------------------------------------------------------------------- the detector interface

class MDDNetDetector(Detector):
    """MDD-Net behind the book's interface. ``fit`` takes the normal images of *all* categories at once
    (``uadkit.data.multiclass``); every item's ``category`` is its class for L_cls.

    Training reads the dataset batch by batch: teacher features and synthetic anomalies are made per
    batch, the memory items start from a reservoir over ``init_images`` images and λ_f is chosen on
    ``fusion_images`` images, so memory does not grow with the number of training images.
    ``num_workers`` (an attribute, default 0) loader processes may read and synthesise the batches;
    the result does not depend on it."""

    name = "mdd_net"
    batch_size_trains = True  # create(batch_size=...) sets the training batch too (config.batch_size)

    def __init__(self, config: MDDConfig | None = None, *, pretrained: bool = True, **kw):
        super().__init__(**kw)
        self.config = c = config or MDDConfig()
        self.teacher = backbones.shared(c.backbone, pretrained=pretrained, device=self.device)  # one per process
        self.model: MDDNet | None = None
        self.classes: list[str] = []
        self.history: list[float] = []
        self.num_workers = 0
        self.fusion_weight: float = 1.0 if c.fusion_weight is None else c.fusion_weight
        self.fusion_curve: dict[float, float] = {}  # validation pixel AUROC of every λ_f candidate

    def training_data(self, dataset, categories: list[str] | None = None) -> DataLoader:
        """The training batches: :class:`TrainingPairs` of ``dataset`` in :class:`FreshDraws` order."""
        c = self.config
        pairs = TrainingPairs(dataset, self.classes, dual=c.dual, source=c.synth_source, categories=categories)
        return DataLoader(pairs, batch_size=c.batch_size, collate_fn=collate, num_workers=self.num_workers,
                          sampler=FreshDraws(len(pairs), torch.Generator().manual_seed(self.seed)),
                          persistent_workers=self.num_workers > 0)

    def _fit(self, train_loader, checkpoint=None) -> None:
        c = self.config
        dataset = train_loader.dataset
        cats = item_categories(dataset)
        self.classes = sorted(set(cats))
        torch.manual_seed(self.seed)
        self.model = MDDNet(teacher=self.teacher, config=c, classes=len(self.classes)).to(self.device)
        g = torch.Generator().manual_seed(self.seed)
        if self.model.memory is not None:
            self.init_memory(dataset, g)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=c.lr, betas=(0.5, 0.999))  # RD4AD's optimiser
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs) if c.cosine_lr else None
        self.history = train.fit(self.model, lambda model, b: training_loss(model, b)["total"],
                                 self.training_data(dataset, cats), epochs=c.epochs, optimizer=opt,
                                 device=self.device, scheduler=sched, checkpoint=checkpoint,
                                 desc="MDD-Net" if c.dual else "RD", progress=self.progress)
        if c.dual and c.fusion_weight is None:
            self.fusion_weight, self.fusion_curve = self.choose_fusion_weight(dataset, g)

    def _sample(self, dataset, n: int, generator: torch.Generator) -> list[int]:
        """``n`` item indices of ``dataset`` drawn at random without replacement (all of them if fewer)."""
        return torch.randperm(len(dataset), generator=generator)[:n].tolist()

    @torch.no_grad()
    def init_memory(self, dataset, generator: torch.Generator) -> None:
        """Every scale's items start at feature vectors drawn at random from the teacher features of
        ``init_images`` training images drawn at random (every class has its share), read batch by batch:
        a :class:`VectorSample` per scale keeps only ``memory_items`` vectors."""
        samples = [VectorSample(len(mem.items), generator) for mem in self.model.memory]
        part = Subset(dataset, self._sample(dataset, self.config.init_images, generator))
        for batch in loader(part, batch_size=self.batch_size):
            for sample, f in zip(samples, self.model.encode(batch["image"].to(self.device))):
                sample.add(f)
        for mem, sample in zip(self.model.memory, samples):
            mem.load_sample(sample)

    @torch.no_grad()
    def choose_fusion_weight(self, dataset, generator: torch.Generator) -> tuple[float, dict[float, float]]:
        """λ_f on validation anomalies: CutPaste patches and scars (alternately) pasted into ``fusion_images``
        training images drawn at random; a synthesis the model never trained on (it trains on Perlin), so
        the choice rewards a signal that generalises to new kinds of defect. No test image is used."""
        idx = self._sample(dataset, self.config.fusion_images, generator)
        s_res, s_dis, masks = [], [], []
        for start in range(0, len(idx), self.batch_size):
            pairs = [synth.cutpaste(dataset[i]["image"], generator=generator, scar=bool(j % 2))
                     for j, i in enumerate(idx[start:start + self.batch_size], start)]
            x = torch.stack([p[0] for p in pairs]).to(self.device)
            out = self.model(x)  # one pass gives both signals
            for signal, parts in (("restoration", s_res), ("discrepancy", s_dis)):
                parts.append(self.smooth(fused_map(out, x.shape[-2:], signal=signal)).float().cpu())
            masks.append(torch.stack([p[1] for p in pairs]))
        return select_fusion_weight(torch.cat(s_res), torch.cat(s_dis), torch.cat(masks), self.config.fusion_grid)

    def smooth(self, maps: torch.Tensor) -> torch.Tensor:
        """RD4AD's Gaussian smoothing, σ = ``smooth_sigma`` pixels of a 256-px image scaled to this one."""
        return gaussian_blur(maps, self.config.smooth_sigma * maps.shape[-1] / 256)

    def maps(self, images: torch.Tensor, *, signal: str | None = None, weight: float | None = None,
             out: dict | None = None) -> torch.Tensor:
        """Smoothed anomaly maps B×1×H×W of one signal ("fused", "restoration", "discrepancy");
        ``weight``: λ_f of the fused map (default: the one chosen after training); ``out``: the model's
        output on ``images`` if already computed (one forward pass serves every signal)."""
        c = self.config
        out = self.model(images) if out is None else out
        signal = signal or (c.signal if c.dual else "restoration")
        s = fused_map(out, images.shape[-2:], signal=signal, weight=self.fusion_weight if weight is None else weight)
        return self.smooth(s)

    def _predict_batch(self, images):
        maps = self.maps(images)
        return image_score(maps), maps


# --------------------------------------------------------------------------- cost of a paper run

def step_cost(config: MDDConfig, *, image_size: int = 256, classes: int = 15, batch_size: int | None = None):
    """One training step and the scoring of one batch at the real shapes, counted on the meta device
    (:func:`uadkit.cost.measure`: shapes only, nothing is computed). Returns ``(train, score)``, two
    :class:`uadkit.cost.StepCost`. ``train`` is :func:`training_loss` forward and backward on a batch of
    ``batch_size`` (default: the config's) images: the frozen teacher on the images and their anomalies,
    CMM, neck and both decoders; ``score`` is :meth:`MDDNetDetector._predict_batch` (the model's forward,
    the fused map, its smoothing). Weights: the teacher's (frozen) and the model's (trained)."""
    from .. import cost

    b, s = batch_size or config.batch_size, image_size
    with torch.device("meta"):
        det = MDDNetDetector(config, pretrained=False, device="meta", progress=False)
        det.model = MDDNet(teacher=det.teacher, config=config, classes=classes)
        det.classes = [str(k) for k in range(classes)]
        batch = {"image": torch.rand(b, 3, s, s), "class": torch.zeros(b, dtype=torch.long),
                 "anomalous": torch.rand(b, 3, s, s), "mask": torch.rand(b, 1, s, s)}
        train_step = cost.measure(lambda: training_loss(det.model, batch)["total"].backward(), det.model, det.teacher)
        with torch.no_grad():
            score = cost.measure(lambda: det._predict_batch(batch["image"]), det.model, det.teacher)
    return train_step, score
