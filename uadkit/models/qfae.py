"""QFAE: the Q-Former Autoencoder for medical anomaly detection (Dalmonte, Bayar, Akbas & Georgescu, 2025).

A plain autoencoder modernised in three steps (the paper's Table 1):

1. a **frozen pretrained encoder** gives tokens from several layers (paper: DINOv2 ViT-L/14
   with registers, the hidden states of the 2nd- and 4th-to-last blocks, concatenated
   along the token axis and projected 1024 → 768);
2. a **Q-Former bottleneck**, Eq. (1): ``m`` learned queries attend to each other, then
   cross-attend to the encoder tokens, then an MLP; ``m = (image size / output patch)²``
   queries, whatever the number of encoder tokens;
3. a light transformer **decoder** turns the ``m`` latent tokens into ``m`` pixel patches,
   unpatchified into the image; it is trained with a **perceptual loss**, Eq. (2) and
   Sec. 6.2 (cosine distances of frozen features, multiplied across input scales,
   averaged across layers).

The anomaly map compares the features of the image and of its reconstruction the same
way, Eq. (3)–(5) and Sec. 6.3.

    torch_model  : QFAEModel           encoder feature maps → reconstruction B×3×H×W
                   QFormer             Eq. (1)
                   Decoder             latent tokens B×m×D → B×3×H×W
    anomaly_map  : PerceptualMaps      Eq. (3) per layer, × over scales (Sec. 6.2): L×B×1×H×W
                   image_score         Eq. (4) "max_mean" (default), "mean_mean" (Table 2b) or "mean_max" (Sec. 8, RSNA)
                   pixel_map           Eq. (5)
    loss         : perceptual_loss     Eq. (2) with Sec. 6.2's aggregation
                   mae_loss            mean absolute error (Table 1 rows 1–2, Table 2a)
    data         : liver_ct_roi        the LiverCT preprocessing of Sec. 7.1

``bottleneck="none"`` gives the plain AE of Table 1 row 1 (encoder features on the output
patch grid go straight into the decoder); ``loss="mae"`` / ``"mae+perceptual"`` the loss
ablations. In the ``smoke`` profile the frozen ImageNet EfficientNet-Lite0 stands in for
both DINOv2 (encoder) and the Masked Autoencoder (perceptual network): its stages are the
"layers", and input *scales* play the role of the MAE's rebuilt patch sizes.
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

from .. import backbones, train
from ..backbones import resize_aligned
from ..data.base import loader
from .base import Detector

__all__ = [
    "QFAEConfig", "num_queries", "vit_network", "feature_network", "EncoderTokens", "GridTokens", "QFormer",
    "Decoder", "QFAEModel", "patchify", "unpatchify", "sincos_2d", "cosine_distance_map", "PerceptualMaps",
    "perceptual_loss", "mae_loss", "features_upto", "image_score", "pixel_map", "liver_ct_roi", "QFAEDetector",
    "step_cost",
]


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class QFAEConfig:
    """QFAE's settings; ``QFAEConfig.for_profile("paper")`` gives the paper's (Tables 6–7)."""

    encoder: str = "dinov2_vitl14_reg"
    encoder_layers: tuple[int, ...] = (-2, -4)  # hidden states whose tokens are concatenated (public code: -2, -4)
    encoder_size: int = 224  # the encoder sees the image at this size (DINOv2/14 at 224 px: 16×16 tokens)
    dim: int = 768  # Proj output = Q-Former width
    qformer_heads: int = 8
    mlp_ratio: float = 4.0
    bottleneck: str = "qformer"  # or "none": the plain AE of Table 1 row 1
    patch: int = 8  # decoder output patch: m = (image size / patch)² queries (784 at 224 px)
    decoder_dim: int = 768
    decoder_depth: int = 6
    decoder_heads: int = 12
    decoder_extra_tokens: int = 5  # a class and 4 register tokens in the decoder (public code)
    loss: str = "perceptual"  # "mae", "mae+perceptual" (Table 2a)
    perceptual: str = "mae_vitl16"
    perceptual_layers: tuple[int, ...] = (15, 19)  # blocks 16 and 20 (Table 6)
    perceptual_scales: tuple[float, ...] = (32, 56)  # ViT: rebuilt patch sizes; CNN: input scale factors
    score_layers: tuple[int, ...] = (11, 15, 19)  # blocks 12, 16, 20 (Table 7)
    score_scales: tuple[float, ...] = (16, 32, 56)
    aggregation: str = "max_mean"  # Eq. (4): mean over maps of each map's max; "mean_max" for RSNA (Sec. 8)
    epochs: int = 300
    lr: float = 8e-5  # the peak of OneCycleLR
    pct_start: float = 0.15  # OneCycleLR warm-up share (public code)
    batch_size: int = 64
    micro_batch: int | None = None  # images per forward/backward pass: a batch's gradients summed over its parts
    augment: bool = True  # Sec. 6.4 augmentations; the encoder then runs on every batch

    @classmethod
    def for_profile(cls, profile: str = "smoke", **overrides) -> "QFAEConfig":
        from ..profiles import get

        if get(profile).is_smoke:
            base = cls(encoder="efficientnet_lite0", encoder_layers=(2, 3, 4), encoder_size=64, dim=128,
                       qformer_heads=4, decoder_dim=128, decoder_depth=2, decoder_heads=4, decoder_extra_tokens=1,
                       perceptual="efficientnet_lite0", perceptual_layers=(1, 2), perceptual_scales=(1.0, 0.5),
                       score_layers=(1, 2), score_scales=(1.0, 0.5), epochs=10, lr=2e-3, batch_size=4,
                       augment=False)  # no augmentation: the encoder's tokens are computed once; 80 steps on 32 images
        else:
            base = cls()
        return dataclasses.replace(base, **overrides)


def num_queries(image_size: int, patch: int) -> int:
    """m = (image size / patch)²: one query per reconstructed patch (784 for 224 px and 8-px patches)."""
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the decoder patch {patch}")
    return (image_size // patch) ** 2


# --------------------------------------------------------------------------- frozen networks

def vit_network(name: str, *, img_size: int = 224, patch_size: int | None = None, pretrained: bool = True):
    """A frozen ViT of the backbone registry rebuilt at ``img_size`` (and ``patch_size``).

    The paper runs DINOv2 at 224 px (pretrained at 518) and the MAE with its patch embedding
    rebuilt at 32 and 56 px (pretrained at 16): the cached weights are resampled
    (patch-embedding kernel and absolute position embedding, timm's FlexiViT-style
    resampling). Returns a :class:`uadkit.backbones.Backbone` whose maps are the blocks'
    tokens, B×D×h×w. Without the cached file: :class:`~uadkit.backbones.WeightsUnavailable`,
    except in a dry run (:mod:`uadkit.dryrun`), where the network is built at random initialisation (printed).
    """
    import timm
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    entry = backbones.REGISTRY[name]
    if entry.kind != "vit":
        raise ValueError(f"{name} is not a ViT")
    path = backbones.weights_path(name)
    if pretrained and not path.is_file():
        from .. import dryrun

        if not dryrun.active():
            raise backbones._unavailable(name, f"no file {path}")
        dryrun.note(f"backbone {name} at RANDOM initialisation: no weights file {path}")
        return _random_vit(name, entry, img_size=img_size, patch_size=patch_size)
    kw = {"img_size": img_size} | ({"patch_size": patch_size} if patch_size else {})
    model = timm.create_model(entry.timm_name, pretrained=False, **kw)
    if pretrained:
        state = torch.load(path, map_location="cpu", weights_only=True)
        w = state["patch_embed.proj.weight"]
        if w.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            state["patch_embed.proj.weight"] = resample_patch_embed(w, list(model.patch_embed.proj.weight.shape[-2:]))
        if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size),
                                                        num_prefix_tokens=prefix)
        model.load_state_dict(state)
    return _backbone(name, model)


def _backbone(name: str, model: nn.Module):
    cfg = model.pretrained_cfg or {}
    return backbones.Backbone(name=name, model=model, kind="vit", mean=cfg.get("mean", (0.485, 0.456, 0.406)),
                              std=cfg.get("std", (0.229, 0.224, 0.225)))


def _random_vit(name: str, entry, *, img_size: int, patch_size: int | None):
    """A dry run's random stand-in for a ViT without cached weights: built on the meta device and filled with
    N(0, 0.02) weights, unit norm scales and zero biases (timm's initialisation of a ViT-L takes seconds on a CPU)."""
    import timm

    kw = {"img_size": img_size} | ({"patch_size": patch_size} if patch_size else {})
    with torch.device("meta"):
        model = timm.create_model(entry.timm_name, pretrained=False, **kw)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
            else:
                p.zero_() if key.endswith("bias") else p.fill_(1.0)
    return _backbone(name, model)


def feature_network(name: str, *, img_size: int, patch_size: int | None = None, pretrained: bool = True,
                    device: str | torch.device = "cpu"):
    """The frozen network ``name`` on ``device``: a CNN from the registry as is, a ViT rebuilt by :func:`vit_network`.

    Shared (:func:`uadkit.backbones.shared`): every detector, and the encoder and perceptual roles, that ask
    for the same network at the same sizes get one instance (the paper profile's DINOv2-L and three MAE-L
    are about 1.2 GB each); never move or change the returned network.
    """
    if backbones.REGISTRY[name].kind == "cnn":
        return backbones.shared(name, pretrained=pretrained, device=device)
    return backbones.shared(name, pretrained=pretrained, device=device, build=vit_network, img_size=img_size,
                            patch_size=patch_size)


def features_upto(net, x: torch.Tensor, last: int) -> list[torch.Tensor]:
    """``net(x)[: last + 1]`` without running the layers after ``last``.

    The perceptual loss of the smoke profile reads early stages of EfficientNet-Lite0; stopping
    there skips most of the network's layers in every training step (forward and backward).
    Networks without timm's EfficientNet stage structure are run whole.
    """
    m = net.model
    if not all(hasattr(m, a) for a in ("conv_stem", "bn1", "blocks", "_stage_out_idx")) or m.feature_hooks is not None:
        return net(x)[: last + 1]
    x = m.bn1(m.conv_stem((x - net.mean) / net.std))
    out = [x] if 0 in m._stage_out_idx else []
    for i, block in enumerate(m.blocks):
        if len(out) > last:
            break
        x = block(x)
        if i + 1 in m._stage_out_idx:
            out.append(x)
    return out


# --------------------------------------------------------------------------- torch_model

def _sincos(dim: int, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """MAE's 2-D sine-cosine code of positions (ys, xs), each of length n: n×dim, half for each axis (on ys' device)."""
    if dim % 4:
        raise ValueError("dim must be a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32, device=ys.device) / (dim // 4))
    out = []
    for pos in (ys, xs):
        t = pos[:, None] * omega[None]
        out += [t.sin(), t.cos()]
    return torch.cat(out, dim=1)


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE's), (h·w)×dim; positions in cell units of the grid."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return _sincos(dim, ys.reshape(-1), xs.reshape(-1))


def _image_frame_sincos(dim: int, h: int, w: int, grid: int = 32, device: str | torch.device | None = None) -> torch.Tensor:
    """Positions of the cell centres of an h×w map in one common frame (a ``grid``×``grid`` image
    lattice), so tokens of maps with different strides that cover the same place get the same code."""
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * grid / h
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * grid / w
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    return _sincos(dim, ys.reshape(-1), xs.reshape(-1))


class EncoderTokens(nn.Module):
    """E = Proj([e_i, e_j, …]): feature maps of several layers → one token sequence B×N×D.

    Each map B×C_i×h_i×w_i becomes h_i·w_i tokens; the layers are concatenated along the
    *token* axis (N = Σ h_i·w_i) and projected to D (one shared Linear when all C_i are equal,
    as for a ViT's blocks; one per layer otherwise, as for a CNN's stages). ViT tokens carry
    their own position; CNN maps get a fixed sine-cosine code of where each cell sits in the image.
    """

    def __init__(self, *, channels: list[int], dim: int, add_position: bool):
        super().__init__()
        shared = len(set(channels)) == 1
        self.proj = nn.ModuleList([nn.Linear(channels[0], dim)] if shared else [nn.Linear(c, dim) for c in channels])
        self.add_position, self.dim = add_position, dim

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        tokens = []
        for i, f in enumerate(feats):
            t = f.flatten(2).transpose(1, 2)  # B×(h·w)×C_i
            t = self.proj[i if len(self.proj) > 1 else 0](t)  # B×(h·w)×D
            if self.add_position:
                t = t + _image_frame_sincos(self.dim, *f.shape[-2:], device=t.device).to(t.dtype)
            tokens.append(t)
        return torch.cat(tokens, dim=1)  # B×N×D


class GridTokens(nn.Module):
    """No bottleneck (Table 1 row 1): the layers resized to the output patch grid, stacked along channels
    and projected: one token per output patch, B×m×D, carrying the encoder's information straight through."""

    def __init__(self, *, channels: list[int], dim: int, grid: int):
        super().__init__()
        self.proj, self.grid = nn.Linear(sum(channels), dim), grid

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = (self.grid, self.grid)
        f = torch.cat([F.adaptive_avg_pool2d(f, size) if f.shape[-1] > self.grid else resize_aligned(f, size)
                       for f in feats], dim=1)  # B×ΣC×g×g
        return self.proj(f.flatten(2).transpose(1, 2))  # B×m×D


class QFormer(nn.Module):
    """Eq. (1), one block: Q = SelfAttn(Q); Q = CrossAttn(Q, E); Z = MLP(Q).

    Q ∈ R^{m×D} are learned queries (the same for every image). As in Eq. (1) and the
    public code there is no residual path around the attentions: whatever reaches Z comes
    through the cross-attention's mixtures of encoder tokens, and its length is m,
    independent of the number N of encoder tokens.
    """

    def __init__(self, *, queries: int, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, queries, dim) * 1e-3)
        self.norm_self, self.self_attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, e: torch.Tensor) -> torch.Tensor:  # e: B×N×D → z: B×m×D
        q = self.norm_self(self.queries)
        q = self.self_attn(q, q, q, need_weights=False)[0].expand(e.shape[0], -1, -1)  # B×m×D
        kv = self.norm_kv(e)
        q = self.cross_attn(self.norm_cross(q), kv, kv, need_weights=False)[0]  # B×m×D
        return self.mlp(q)

    def attention(self, e: torch.Tensor) -> torch.Tensor:
        """Cross-attention weights B×m×N (averaged over heads), to look at which tokens each query reads."""
        q = self.norm_self(self.queries)
        q = self.self_attn(q, q, q, need_weights=False)[0].expand(e.shape[0], -1, -1)
        kv = self.norm_kv(e)
        return self.cross_attn(self.norm_cross(q), kv, kv, need_weights=True)[1]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """B×C×H×W → B×(H/p·W/p)×(p·p·C), row-major patches."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(t: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """B×m×(p·p·C) → B×C×(√m·p)×(√m·p), the inverse of :func:`patchify`."""
    b, m, _ = t.shape
    g = math.isqrt(m)
    if g * g != m:
        raise ValueError(f"{m} tokens do not form a square grid")
    return t.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * p, g * p)


class Decoder(nn.Module):
    """Latent tokens B×m×D → image B×3×H×W (MAE's decoder, as in the public code):
    Linear to the decoder width, + fixed 2-D sine-cosine positions, extra (class/register)
    tokens, pre-norm transformer layers, LayerNorm, Linear to p·p·3 pixels per token, unpatchify."""

    def __init__(self, *, tokens: int, in_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, patch: int,
                 extra_tokens: int):
        super().__init__()
        g = math.isqrt(tokens)
        self.patch, self.embed = patch, nn.Linear(in_dim, dim)
        self.register_buffer("pos", sincos_2d(dim, g, g)[None], persistent=False)  # 1×m×dim
        self.extra = nn.Parameter(torch.randn(1, extra_tokens, dim) * 1e-3) if extra_tokens else None
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, patch * patch * 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        t = self.embed(z) + self.pos  # B×m×dim
        n_extra = 0 if self.extra is None else self.extra.shape[1]
        if n_extra:
            t = torch.cat([self.extra.expand(len(t), -1, -1), t], dim=1)  # B×(extra+m)×dim
        for layer in self.layers:
            t = layer(t)
        pixels = self.head(self.norm(t[:, n_extra:]))  # B×m×(p·p·3)
        return unpatchify(pixels, self.patch)  # B×3×H×W


class QFAEModel(nn.Module):
    """The trainable part: encoder feature maps (list of B×C_i×h_i×w_i) → reconstruction B×3×H×W.

    tokens (Proj) → Q-Former (or nothing, for the plain AE) → decoder.
    """

    def __init__(self, *, channels: list[int], image_size: int, config: QFAEConfig, cnn_encoder: bool):
        super().__init__()
        c = config
        m = num_queries(image_size, c.patch)
        if c.bottleneck == "qformer":
            self.tokens = EncoderTokens(channels=channels, dim=c.dim, add_position=cnn_encoder)
            self.bottleneck = QFormer(queries=m, dim=c.dim, heads=c.qformer_heads, mlp_ratio=c.mlp_ratio)
        elif c.bottleneck == "none":
            self.tokens = GridTokens(channels=channels, dim=c.dim, grid=image_size // c.patch)
            self.bottleneck = nn.Identity()
        else:
            raise ValueError(f"bottleneck must be 'qformer' or 'none', got {c.bottleneck!r}")
        self.decoder = Decoder(tokens=m, in_dim=c.dim, dim=c.decoder_dim, depth=c.decoder_depth,
                               heads=c.decoder_heads, mlp_ratio=c.mlp_ratio, patch=c.patch,
                               extra_tokens=c.decoder_extra_tokens)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.tokens(list(feats))))


# --------------------------------------------------------------------------- anomaly_map

def cosine_distance_map(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Eq. (3): A(j, k) = 1 − cos(f_(j,k), g_(j,k)), B×C×h×w twice → B×1×h×w, values in [0, 2].

    In float32 whatever the features' dtype (bf16 under autocast): the maps become scores and losses."""
    return 1 - F.cosine_similarity(f.float(), g.float(), dim=1, eps=1e-8)[:, None]


class PerceptualMaps(nn.Module):
    """Per-layer anomaly maps of a frozen perceptual network (Sec. 6.2, steps 1–3 up to the mean):

    for every layer i and every scale s, A_{i,s} = 1 − cos(Φ_{i,s}(x), Φ_{i,s}(x̃)) (Eq. 3);
    the maps of one layer are resized to H×W and **multiplied across scales**:
    A_i = Π_s Resize(A_{i,s}). Returns L×B×1×H×W.

    A scale is a rebuilt patch size for a ViT (the MAE at 32 and 56 px: one network each)
    or an input scale factor for a CNN (the image resized by s, one shared network). Networks not
    given in ``nets`` are taken from :func:`feature_network` on ``device`` (shared, frozen).
    """

    def __init__(self, *, name: str, layers: tuple[int, ...], scales: tuple[float, ...], image_size: int,
                 pretrained: bool = True, nets: dict | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.layers, self.scales = tuple(layers), tuple(scales)
        self.cnn = backbones.REGISTRY[name].kind == "cnn"
        nets = dict(nets or {})
        for s in self.scales:
            key = "cnn" if self.cnn else str(int(s))
            if key not in nets:
                nets[key] = feature_network(name, img_size=image_size, patch_size=None if self.cnn else int(s),
                                            pretrained=pretrained, device=device)
        self.nets = nn.ModuleDict(nets)

    def raw(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[tuple[int, float], torch.Tensor]:
        """{(layer, scale): A_{i,s} resized to H×W} for every layer and scale, each B×1×H×W."""
        out, size = {}, x.shape[-2:]
        for s in self.scales:
            net = self.nets["cnn" if self.cnn else str(int(s))]
            a, b = x, x_hat
            if self.cnn and s != 1:
                hw = [max(8, round(s * n)) for n in size]
                a, b = (F.interpolate(t.float(), size=hw, mode="bilinear", align_corners=False, antialias=s < 1)
                        for t in (x, x_hat))  # float: the CPU's antialiased resize has no bf16 kernel (autocast)
            last = max(self.layers) if self.cnn else None
            run = (lambda t: features_upto(net, t, last)) if self.cnn else net
            with torch.no_grad():
                fa = run(a)
            fb = run(b)
            for i in self.layers:
                out[(i, s)] = F.interpolate(cosine_distance_map(fa[i], fb[i]), size=size, mode="bilinear",
                                            align_corners=False)
        return out

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return combine(self.raw(x, x_hat), self.layers, self.scales)


def combine(raw: dict, layers, scales) -> torch.Tensor:
    """Sec. 6.2 step 3 on precomputed maps: per layer, the product across ``scales``; L×B×1×H×W."""
    return torch.stack([torch.stack([raw[(i, s)] for s in scales]).prod(0) for i in layers])


def image_score(maps: torch.Tensor, aggregation: str = "max_mean") -> torch.Tensor:
    """Image score from per-layer maps L×B×1×H×W → B.

    ``"max_mean"``, Eq. (4) / Sec. 6.3: the maximum of each map, averaged over the maps.
    ``"mean_mean"``: the mean of each map, averaged over the maps (Table 2b's "mean").
    ``"mean_max"``, Sec. 8 (RSNA): the mean of each map, then the maximum over the maps;
    a small bright artefact moves a map's maximum a lot but its mean little.
    """
    flat = maps.flatten(2)  # L×B×(H·W)
    if aggregation == "max_mean":
        return flat.max(dim=2).values.mean(dim=0)
    if aggregation == "mean_mean":
        return flat.mean(dim=2).mean(dim=0)
    if aggregation == "mean_max":
        return flat.mean(dim=2).max(dim=0).values
    raise ValueError(f"aggregation must be 'max_mean', 'mean_mean' or 'mean_max', got {aggregation!r}")


def pixel_map(maps: torch.Tensor) -> torch.Tensor:
    """Eq. (5): the pixel-wise mean of the per-layer maps, L×B×1×H×W → B×1×H×W."""
    return maps.mean(dim=0)


# --------------------------------------------------------------------------- loss

def perceptual_loss(maps: torch.Tensor) -> torch.Tensor:
    """Eq. (2) with Sec. 6.2's aggregation: the mean of each layer's (scale-multiplied) map,
    averaged over layers and the batch. ``maps`` L×B×1×H×W from :class:`PerceptualMaps`."""
    return maps.mean()


def mae_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between the image and its reconstruction (Table 1 rows 1–2)."""
    return (x - x_hat).abs().mean()


# --------------------------------------------------------------------------- LiverCT preprocessing (Sec. 7.1)

def liver_ct_roi(image: np.ndarray, mask: np.ndarray | None = None, *, size: int = 224, bilateral: bool = True):
    """Sec. 7.1: crop the union bounding box of the non-zero pixels, centre it on a black
    ``size``×``size`` canvas (pasted as is when it fits, else resized keeping its aspect ratio),
    then a bilateral filter (the public code's d=9, σ_colour = σ_space = 75 on 0–255).

    ``image`` H×W (or H×W×3, converted to grey) uint8 or float in [0, 1]; ``mask`` H×W follows the
    same geometry (nearest neighbour, no filter). Returns uint8 ``size``×``size`` (and the mask).
    """
    from PIL import Image

    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., :3].mean(-1)
    if img.dtype != np.uint8:
        img = np.clip(np.round(img * 255 if img.max() <= 1.0 else img), 0, 255).astype(np.uint8)
    canvas = np.zeros((size, size), np.uint8)
    out_mask = np.zeros((size, size), np.uint8) if mask is not None else None
    ys, xs = np.nonzero(img)
    if len(ys):
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = img[y0:y1, x0:x1]
        mcrop = None if mask is None else (np.asarray(mask)[y0:y1, x0:x1] > 0).astype(np.uint8) * 255
        h, w = crop.shape
        if h > size or w > size:
            scale = min(size / h, size / w)
            h, w = max(1, int(h * scale)), max(1, int(w * scale))
            crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR))
            if mcrop is not None:
                mcrop = np.asarray(Image.fromarray(mcrop).resize((w, h), Image.NEAREST))
        top, left = (size - h) // 2, (size - w) // 2
        canvas[top:top + h, left:left + w] = crop
        if out_mask is not None:
            out_mask[top:top + h, left:left + w] = mcrop
        if bilateral:
            from skimage.restoration import denoise_bilateral

            smooth = denoise_bilateral(canvas.astype(np.float64) / 255, win_size=9, sigma_color=75 / 255,
                                       sigma_spatial=75, mode="constant", cval=0)
            canvas = np.clip(np.round(smooth * 255), 0, 255).astype(np.uint8)
    return canvas if mask is None else (canvas, out_mask)


# --------------------------------------------------------------------------- the detector interface

class QFAEDetector(Detector):
    """QFAE behind the book's interface: ``fit`` trains Proj + Q-Former + decoder on normal
    images (encoder and perceptual network frozen); ``predict`` scores with Eq. (3)–(5).

    The frozen networks come from :func:`feature_network`: detectors in one process that use the
    same encoder or perceptual network share one instance of it.
    """

    name = "qfae"

    def __init__(self, config: QFAEConfig | None = None, *, pretrained: bool = True, **kw):
        super().__init__(**kw)
        self.config = c = config or QFAEConfig()
        self.pretrained = pretrained
        self.encoder = feature_network(c.encoder, img_size=c.encoder_size, pretrained=pretrained, device=self.device)
        self.cnn_encoder = backbones.REGISTRY[c.encoder].kind == "cnn"
        self.model: QFAEModel | None = None
        self.history: list[float] = []
        self._train_perc: PerceptualMaps | None = None
        self._score_perc: PerceptualMaps | None = None

    # -- frozen parts
    def _layers(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [feats[i] for i in self.config.encoder_layers]

    @torch.no_grad()
    def _encode_batch(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The chosen encoder layers of one batch B×3×H×W, on its device (the encoder sees ``encoder_size``)."""
        size = self.config.encoder_size
        if x.shape[-1] != size:
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self._layers(self.encoder(x))

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The chosen encoder layers of images N×3×H×W, in batches on the detector's device: a list of
        N×C_i×h_i×w_i on the device ``images`` are on."""
        out = [[f.to(images.device) for f in self._encode_batch(images[i:i + self.batch_size].to(self.device))]
               for i in range(0, len(images), self.batch_size)]
        return [torch.cat(parts) for parts in zip(*out)]

    @staticmethod
    def augment(x: torch.Tensor) -> torch.Tensor:
        """Sec. 6.4, per image: random resized crop (90–100 % of the area, aspect 0.8–1.2), rotation
        within ±10°, vertical flip (p = 0.5), brightness and contrast jitter of up to 0.1."""
        from torchvision.transforms import v2

        t = v2.Compose([v2.RandomResizedCrop(x.shape[-2:], scale=(0.9, 1.0), ratio=(0.8, 1.2), antialias=True),
                        v2.RandomRotation(10), v2.RandomVerticalFlip(0.5), v2.ColorJitter(brightness=0.1, contrast=0.1)])
        return torch.stack([t(img) for img in x]).clamp(0, 1)

    def perceptual(self, which: str = "score", *, image_size: int | None = None) -> PerceptualMaps:
        """The perceptual network with the training (``"train"``) or scoring (``"score"``) layers and scales.

        Built once, for the training images' size (or ``image_size`` before ``fit``), from the shared
        frozen networks (one per patch size, whichever role and detector asks)."""
        c = self.config
        attr = "_train_perc" if which == "train" else "_score_perc"
        if getattr(self, attr) is not None:
            return getattr(self, attr)
        if image_size is None:
            if self.image_size is None:
                raise RuntimeError("qfae: call fit() first, or pass image_size= to perceptual()")
            image_size = self.image_size[-1]
        layers, scales = (c.perceptual_layers, c.perceptual_scales) if which == "train" else (c.score_layers, c.score_scales)
        setattr(self, attr, PerceptualMaps(name=c.perceptual, layers=layers, scales=scales, image_size=image_size,
                                           pretrained=self.pretrained, device=self.device))
        return getattr(self, attr)

    # -- training
    def build_model(self, image_size: int) -> QFAEModel:
        """A fresh trainable part (Proj + Q-Former + decoder) for square images of side ``image_size``, on the device."""
        channels = [self.encoder.channels[i] for i in self.config.encoder_layers]
        return QFAEModel(channels=channels, image_size=image_size, config=self.config,
                         cnn_encoder=self.cnn_encoder).to(self.device)

    def _loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        kind = self.config.loss
        if kind == "mae":
            return mae_loss(x, x_hat)
        if kind == "perceptual":
            return perceptual_loss(self.perceptual("train")(x, x_hat))
        if kind == "mae+perceptual":  # as the public code: the mean of the MAE and the L per-layer terms
            n = len(self.config.perceptual_layers)
            return (mae_loss(x, x_hat) + n * perceptual_loss(self.perceptual("train")(x, x_hat))) / (n + 1)
        raise ValueError(f"loss must be 'mae', 'perceptual' or 'mae+perceptual', got {kind!r}")

    def _fit(self, train_loader, checkpoint=None) -> None:
        """Adam + OneCycleLR through :func:`uadkit.train.fit` (Sec. 6.4).

        With ``augment`` (the paper) the images are streamed: every batch is read from the dataset,
        augmented and encoded on the device, and nothing is kept, so memory does not grow with the
        training set. Without it (the smoke profile) the encoder's tokens of the whole, small, training
        set are computed once and held with the images.
        """
        c = self.config
        torch.manual_seed(self.seed)
        dataset = train_loader.dataset
        if c.augment:  # every batch is augmented, then encoded
            data = loader(dataset, batch_size=c.batch_size, shuffle=True, seed=self.seed)
            loss = lambda m, b: self._step(m, self.augment(b["image"]))  # noqa: E731
        else:  # the encoder is frozen: its tokens are computed once
            images = torch.cat([b["image"] for b in train_loader])
            data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, *self.encode(images)),
                                               batch_size=c.batch_size, shuffle=True,
                                               generator=torch.Generator().manual_seed(self.seed))
            loss = lambda m, b: self._loss(b[0], m(b[1:]))  # noqa: E731
        self.model = self.build_model(self.image_size[-1])
        opt = torch.optim.Adam(self.model.parameters(), lr=c.lr)
        # train.fit steps schedulers once per epoch (the public code: once per batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=max(2, c.epochs),
                                                    pct_start=c.pct_start)
        self.history = train.fit(self.model, loss, data, epochs=c.epochs, optimizer=opt, scheduler=sched,
                                 device=self.device, checkpoint=checkpoint, micro_batch=c.micro_batch,
                                 desc=f"QFAE ({c.bottleneck}, {c.loss})", progress=self.progress)

    def _step(self, model: QFAEModel, x: torch.Tensor) -> torch.Tensor:
        """The loss of one batch of (augmented) images x, encoded here."""
        return self._loss(x, model(self._encode_batch(x)))

    # -- inference
    def amp(self):
        """The autocast of training (:func:`uadkit.train.use_amp`: bf16 on CUDA and in a dry run, else off),
        for scoring: the model is scored with the networks in the precision its loss was computed in."""
        if torch.device(self.device).type not in ("cuda", "cpu"):  # "meta" (uadkit.cost) has no autocast
            return contextlib.nullcontext()
        return train.autocast(self.device, train.use_amp(self.device))

    def _reconstruct_batch(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ of one batch B×3×H×W, on its device, in float32."""
        with self.amp():
            return self.model(self._encode_batch(x)).float()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """x̃ for images N×3×H×W, in batches on the detector's device; returned on the device ``images`` are on."""
        return torch.cat([self._reconstruct_batch(images[i:i + self.batch_size].to(self.device)).to(images.device)
                          for i in range(0, len(images), self.batch_size)])

    def _predict_batch(self, images):
        x_hat = self._reconstruct_batch(images)
        with self.amp():
            maps = self.perceptual("score")(images, x_hat)  # L×B×1×H×W, float32 (cosine_distance_map)
        return image_score(maps, self.config.aggregation), pixel_map(maps)


# --------------------------------------------------------------------------- cost

_COSTS: dict = {}  # measured parts of step_cost, by network and shape


def _part(key, fn):
    if key not in _COSTS:
        _COSTS[key] = fn()
    return _COSTS[key]


def step_cost(config: QFAEConfig, *, image_size: int = 224, batch_size: int | None = None):
    """One training step and the scoring of one batch at the real shapes, counted on the meta device
    (:func:`uadkit.cost.measure`: shapes only, nothing is computed). Returns ``(train, score)``, two
    :class:`uadkit.cost.StepCost`; ``score.activation_bytes`` is 0 (no gradients).

    Counted in the parts that :meth:`QFAEDetector._step` and ``_predict_batch`` run: the frozen encoder's
    forward; Proj + Q-Former + decoder, forward and backward; the loss (the perceptual networks on x and on x̃,
    and the backward through x̃; a pixel loss only for ``loss="mae"``); for scoring, the encoder, the model's
    forward and the scoring networks on x and x̃. The frozen networks' parts are measured once per network and
    shape and reused, so that a table of configurations is counted in seconds. Weights: the model's (trained)
    and those of every frozen network the detector holds.
    """
    from .. import cost

    c, s = config, image_size
    b = batch_size or c.batch_size
    det = QFAEDetector(c, device="meta", progress=False)
    det.image_size, det.model = (s, s), det.build_model(s)
    x = torch.rand(b, 3, s, s, device="meta")
    x_hat = torch.rand(b, 3, s, s, device="meta", requires_grad=True)
    maps = torch.rand(len(c.score_layers), b, 1, s, s, device="meta")
    frozen = {id(n): n for n in [det.encoder, *det.perceptual("train").nets.values(),
                                 *det.perceptual("score").nets.values()]}
    weights = cost.measure(lambda: None, det.model, *frozen.values())

    def encoder():  # the cost and the tokens (meta tensors) of the frozen encoder
        out = []
        return cost.measure(lambda: out.append(det._encode_batch(x))), out[0]

    with torch.no_grad():
        enc, feats = _part(("encoder", c.encoder, c.encoder_layers, c.encoder_size, s, b), encoder)
        forward = cost.measure(lambda: det.model(feats))
        score_maps = _part(("score", c.perceptual, c.score_layers, c.score_scales, s, b),
                           lambda: cost.measure(lambda: det.perceptual("score")(x, x_hat)))
        pooled = cost.measure(lambda: (image_score(maps, c.aggregation), pixel_map(maps)))
    model = cost.measure(lambda: det.model(feats).sum().backward(), det.model)
    loss = _part(("loss", c.loss, c.perceptual, c.perceptual_layers, c.perceptual_scales, s, b),
                 lambda: cost.measure(lambda: det._loss(x, x_hat).backward()))
    train = cost.StepCost(flops=enc.flops + model.flops + loss.flops,
                          activation_bytes=model.activation_bytes + loss.activation_bytes,
                          param_bytes=weights.param_bytes, trainable_bytes=weights.trainable_bytes)
    score = cost.StepCost(flops=enc.flops + forward.flops + score_maps.flops + pooled.flops, activation_bytes=0,
                          param_bytes=weights.param_bytes, trainable_bytes=0)
    return train, score
