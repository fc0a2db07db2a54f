"""MemMC-MAE: memory-augmented multi-level cross-attentional masked autoencoder
(Tian, Pang, Liu, Chen, Verjans & Carneiro, 2022; arXiv:2203.11725).

A masked autoencoder (MAE) trained from scratch on normal images only: 75 % of
the patches are hidden, the encoder sees the rest, the decoder paints the
hidden ones back. Anomalies that are hidden cannot be painted back; the paper
adds two operators so that anomalies that stay *visible* are not copied either:

    torch_model  : MemMCMAE                 images B×3×H×W → predicted patches B×N×(p·p·3), mask B×N
                   MemoryAttention          Eq. (1): learnable M_K, M_V appended to keys and values
                   MultiLevelDecoderBlock   Eq. (2)–(3): cross-attention into every encoder level, sigmoid gates
    loss         : masked_mse               MSE on the pixels of the masked patches only
    anomaly_map  : ms_ssim_map / mse_map    reconstruction error per pixel, averaged over mask seeds,
                   patch_map                then per patch (Sec. 2.2)
    image score  : mean over patches

The rows of the paper's Table 2 are switches of one module:
``memory=False, multi_level=False`` (plain MAE), ``memory=True`` (+ Mem-Enc),
``memory=True, multi_level=True`` (+ MC-Dec, the full model).

The paper has no public code: everything below is a reimplementation from the text;
the choices it leaves open are listed in the chapter's "Reimplementation notes".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dryrun, train
from .base import Detector

__all__ = [
    "MemMCConfig", "patchify", "unpatchify", "sincos_pos_embed_2d", "random_masking",
    "MemoryAttention", "EncoderBlock", "DecoderBlock", "MultiLevelDecoderBlock", "MemMCMAE",
    "masked_mse", "ssim_components", "ms_ssim_map", "mse_map", "patch_map", "MemMCDetector",
]


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class MemMCConfig:
    """MemMC-MAE's settings; ``MemMCConfig.for_profile("paper")`` gives the paper's (ViT-B encoder)."""

    patch: int = 16  # patch side in pixels (ViT-B/16)
    dim: int = 768  # encoder width (ViT-B)
    depth: int = 12  # encoder layers L
    heads: int = 12
    decoder_dim: int = 512  # MAE's light decoder
    decoder_depth: int = 8  # decoder layers D
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    memory_slots: int = 10  # rows of M_K and M_V per encoder layer (not given in the paper)
    mask_ratio: float = 0.75
    memory: bool = True  # Eq. (1) memory-augmented self-attention in the encoder (Table 2 "Mem-Enc")
    multi_level: bool = True  # Eq. (2)-(3) multi-level cross-attention decoder (Table 2 "MC-Dec")
    unet_skips: bool = True  # long residual links from earlier to later blocks ("inspired by U-Net")
    epochs: int = 2000
    warmup_epochs: int = 5
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    batch_size: int = 256
    micro_batch: int | None = 64  # images per forward/backward pass; gradients of a batch are summed over its parts
    augment: bool = True  # RandomResizedCrop during training
    crop_scale: tuple[float, float] = (0.8, 1.0)  # its area range (not given in the paper)
    mask_seeds: int = 10  # masks averaged at test time (Sec. 2.2)
    score: str = "ms-ssim"  # or "mse"
    ssim_scales: int = 5  # MS-SSIM scales (5 at 224 px; fewer for small images)
    ssim_window: int = 11

    @classmethod
    def for_profile(cls, profile: str = "smoke", **overrides) -> "MemMCConfig":
        from ..profiles import get

        if get(profile).is_smoke:  # 64-px images: 8×8 patches → 64 tokens, a small ViT from scratch
            base = cls(patch=8, dim=64, depth=4, heads=4, decoder_dim=64, decoder_depth=2, decoder_heads=4,
                       mlp_ratio=2.0, memory_slots=10, epochs=20, warmup_epochs=5, lr=1.5e-3, batch_size=32,
                       micro_batch=None, ssim_scales=3, ssim_window=7)
        else:
            base = cls()
        return dataclasses.replace(base, **overrides)


# --------------------------------------------------------------------------- patches, positions, masking

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Images B×C×H×W → patches B×N×(p·p·C), row-major over the (H/p)×(W/p) grid."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(t: torch.Tensor, p: int, grid: tuple[int, int], c: int = 3) -> torch.Tensor:
    """Patches B×N×(p·p·C) → images B×C×H×W (inverse of :func:`patchify`)."""
    b = t.shape[0]
    gh, gw = grid
    x = t.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * p, gw * p)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE's): N×dim, half the channels for each axis."""
    if dim % 4:
        raise ValueError(f"the embedding width must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                            indexing="ij")
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        angle = pos[:, None] * omega[None]  # N×dim/4
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def random_masking(n_tokens: int, batch: int, ratio: float, *, generator: torch.Generator | None = None,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking. Returns ``keep`` B×n_visible (indices of the visible
    tokens, sorted) and ``mask`` B×N (1 = masked, 0 = visible). n_visible = round(N·(1 − ratio))."""
    n_keep = max(1, int(round(n_tokens * (1 - ratio))))
    noise = torch.rand(batch, n_tokens, generator=generator)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    mask = torch.ones(batch, n_tokens)
    mask.scatter_(1, keep, 0.0)
    return keep.to(device), mask.to(device)


# --------------------------------------------------------------------------- attention operators

class MemoryAttention(nn.Module):
    """Eq. (1): X⁽ˡ⁺¹⁾ = f_SA(W_Q X, [W_K X, M_K], [W_V X, M_V]).

    Multi-head self-attention whose keys and values are extended with ``slots`` learnable
    rows M_K, M_V ∈ R^{slots×D} (updated by back-propagation): a query can attend to the
    n tokens of the image *or* to the memory of normal patterns. ``slots=0`` is plain
    self-attention.
    """

    def __init__(self, *, dim: int, heads: int, slots: int):
        super().__init__()
        self.heads, self.slots = heads, slots
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.memory_k = nn.Parameter(torch.randn(slots, dim) * 0.02) if slots else None
        self.memory_v = nn.Parameter(torch.randn(slots, dim) * 0.02) if slots else None

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x B×n×D → (output B×n×D, attention weights B×heads×n×(n + slots))."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each B×n×D
        if self.slots:  # the memory in the keys' dtype: bf16 under autocast, like W_K X
            k = torch.cat([k, self.memory_k.to(k.dtype).expand(b, -1, -1)], dim=1)  # B×(n+m)×D
            v = torch.cat([v, self.memory_v.to(v.dtype).expand(b, -1, -1)], dim=1)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)  # B×h×(n or n+m)×D/h
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)  # B×h×n×(n+m)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)[0]


class MLP(nn.Sequential):
    def __init__(self, *, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + MemoryAttention(LN x), then x + MLP(LN x)."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float, slots: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), MemoryAttention(dim=dim, heads=heads, slots=slots)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim=dim, ratio=mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B×n×D
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Plain MAE decoder block (self-attention over all N tokens + MLP); ignores the encoder levels."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float, **_):
        super().__init__()
        self.block = EncoderBlock(dim=dim, heads=heads, mlp_ratio=mlp_ratio, slots=0)

    def forward(self, y: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.block(y)


class MultiLevelDecoderBlock(nn.Module):
    """Eq. (2)–(3), one decoder layer d:

        S      = f_SA(Y, Y, Y)                                      self-attention over all N tokens
        C_l    = f_SA(S, W_K⁽ᵈ⁾ X⁽ˡ⁾, W_V⁽ᵈ⁾ X⁽ˡ⁾)    l = 1..L       cross-attention into encoder level l
        α(d,l) = σ(W_α⁽ᵈ'ˡ⁾ [S, C_l])                               Eq. (3), one gate in (0,1) per token
        Y'     = Σ_l α(d,l) · C_l                                   Eq. (2)

    W_K, W_V are shared by the levels of a layer (they carry the index d only, as in Eq. (2)) and
    map the encoder width to the decoder width. Around Eq. (2) sit the usual pre-LN residuals
    and an MLP: Y ← Y + S;  Y ← Y + Y';  Y ← Y + MLP(LN Y).
    In Eq. (3) the paper feeds the gate with Y⁽ᵈ⁺¹⁾, the very sum the gate weighs; we read it
    as the cross-attention result C_l of that level (see the reimplementation notes).
    """

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float, encoder_dim: int, levels: int):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), MemoryAttention(dim=dim, heads=heads, slots=0)
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(encoder_dim)
        self.cross = nn.MultiheadAttention(dim, heads, kdim=encoder_dim, vdim=encoder_dim, batch_first=True)
        self.gates = nn.ModuleList(nn.Linear(2 * dim, 1) for _ in range(levels))  # W_α^(d,l)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim=dim, ratio=mlp_ratio)
        self.last_gates: torch.Tensor | None = None  # B×N×L of the last forward, for inspection

    def forward(self, y: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        # y: B×N×Dd (all tokens); levels: L tensors B×n×De (encoder outputs, visible tokens only)
        y = y + self.self_attn(self.norm1(y))  # S (with its residual)
        q = self.norm_q(y)
        fused, gates = 0, []
        for x_l, gate in zip(levels, self.gates):
            kv = self.norm_kv(x_l)
            c_l = self.cross(q, kv, kv, need_weights=False)[0]  # B×N×Dd
            a = torch.sigmoid(gate(torch.cat([q, c_l], dim=-1)))  # B×N×1, Eq. (3)
            fused = fused + a * c_l  # Eq. (2)
            gates.append(a)
        self.last_gates = torch.cat(gates, dim=-1).detach()
        y = y + fused
        return y + self.mlp(self.norm2(y))


def _run_with_skips(blocks: nn.ModuleList, x: torch.Tensor, skips: bool, *args) -> tuple[torch.Tensor, list]:
    """Run ``blocks`` in turn; with ``skips``, the input of block i is added to the output of block
    depth−1−i (i < depth/2): U-Net-like long residual links. Returns the output and every block's output."""
    depth, saved, outs = len(blocks), [], []
    for i, blk in enumerate(blocks):
        if skips and i < depth // 2:
            saved.append(x)
        x = blk(x, *args)
        if skips and i >= depth - depth // 2:
            x = x + saved.pop()
        outs.append(x)
    return x, outs


# --------------------------------------------------------------------------- the model

class MemMCMAE(nn.Module):
    """ViT masked autoencoder with the Table-2 switches ``memory`` and ``multi_level``.

    ``forward(images, keep, mask)`` → predicted patches B×N×(p·p·3) for *all* N tokens.
    """

    def __init__(self, *, image_size: int, config: MemMCConfig, channels: int = 3):
        super().__init__()
        c = config
        if image_size % c.patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {c.patch}")
        self.config, self.patch, self.channels = c, c.patch, channels
        self.grid = (image_size // c.patch, image_size // c.patch)
        n = self.grid[0] * self.grid[1]
        self.embed = nn.Linear(c.patch * c.patch * channels, c.dim)  # W⁽⁰⁾
        self.register_buffer("pos", sincos_pos_embed_2d(c.dim, self.grid)[None], persistent=False)  # 1×N×De
        self.encoder = nn.ModuleList(
            EncoderBlock(dim=c.dim, heads=c.heads, mlp_ratio=c.mlp_ratio, slots=c.memory_slots if c.memory else 0)
            for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(c.dim)
        self.decoder_embed = nn.Linear(c.dim, c.decoder_dim)  # the projection between the two widths
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        self.register_buffer("decoder_pos", sincos_pos_embed_2d(c.decoder_dim, self.grid)[None], persistent=False)
        block = MultiLevelDecoderBlock if c.multi_level else DecoderBlock
        self.decoder = nn.ModuleList(
            block(dim=c.decoder_dim, heads=c.decoder_heads, mlp_ratio=c.mlp_ratio, encoder_dim=c.dim, levels=c.depth)
            for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_dim)
        self.head = nn.Linear(c.decoder_dim, c.patch * c.patch * channels)
        self.n_tokens = n
        self._init()

    def _init(self):
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encode(self, images: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Visible patches only: images B×3×H×W, keep B×n → last output B×n×De and every level X⁽¹⁾..X⁽ᴸ⁾."""
        tokens = self.embed(patchify(images, self.patch)) + self.pos  # B×N×De
        x = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))  # B×n×De
        x, levels = _run_with_skips(self.encoder, x, self.config.unet_skips)
        return self.encoder_norm(x), levels

    def decode(self, latent: torch.Tensor, levels: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """latent B×n×De → all N tokens (visible ones projected, mask tokens elsewhere) → patches B×N×(p·p·3)."""
        b, n_vis = keep.shape
        v = self.decoder_embed(latent)  # B×n×Dd (bf16 under autocast)
        y = self.mask_token.to(v.dtype).expand(b, self.n_tokens, -1).clone()  # B×N×Dd, in v's dtype for scatter
        y = y.scatter(1, keep[..., None].expand(-1, -1, v.shape[-1]), v)
        y = y + self.decoder_pos
        y, _ = _run_with_skips(self.decoder, y, self.config.unet_skips, levels)
        return self.head(self.decoder_norm(y))

    def forward(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        latent, levels = self.encode(images, keep)
        return self.decode(latent, levels, keep)

    def reconstruct(self, images: torch.Tensor, *, generator: torch.Generator | None = None):
        """One random mask: returns (prediction B×3×H×W, composite B×3×H×W, pixel mask B×1×H×W).
        The composite shows the original on visible patches and the prediction on masked ones."""
        keep, mask = random_masking(self.n_tokens, images.shape[0], self.config.mask_ratio, generator=generator,
                                    device=images.device)
        pred = unpatchify(self(images, keep), self.patch, self.grid, self.channels)
        pix = unpatchify(mask[..., None].expand(-1, -1, self.patch * self.patch), self.patch, self.grid, 1)
        return pred, pix * pred + (1 - pix) * images, pix


# --------------------------------------------------------------------------- loss

def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: mean squared error per patch (B×N×P), averaged over the *masked* patches only (mask 1).
    Computed in float32 whatever the prediction's dtype (bf16 under autocast)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # B×N
    return (per_patch * mask).sum() / mask.sum()


# --------------------------------------------------------------------------- anomaly map and score

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik (2003)


def _gaussian(window: int, sigma: float, channels: int, device) -> torch.Tensor:
    r = torch.arange(window, dtype=torch.float32, device=device) - (window - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    return g.expand(channels, 1, window, window).contiguous()


def ssim_components(x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5):
    """Luminance l and contrast-structure cs maps of SSIM, B×C×H×W each (same size, reflect-padded)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # data range 1
    k = _gaussian(window, sigma, x.shape[1], x.device)
    blur = lambda t: F.conv2d(F.pad(t, [window // 2] * 4, mode="reflect"), k, groups=x.shape[1])  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    lum = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
    cs = (2 * cov + c2) / (vx + vy + c2)
    return lum, cs


def ms_ssim_map(x: torch.Tensor, y: torch.Tensor, *, scales: int = 5, window: int = 11) -> torch.Tensor:
    """A per-pixel MS-SSIM: Π_j cs_j^{w_j} · l_M^{w_M}, each scale's map upsampled to full size,
    channels averaged: B×C×H×W → B×1×H×W in [0, 1] (cs and l clamped at 0 before the powers).
    The weights are the first ``scales`` of Wang et al.'s five, renormalised to sum to 1."""
    w = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
    w = w / w.sum()
    size, out = x.shape[-2:], 1.0
    for j in range(scales):
        lum, cs = ssim_components(x, y, window=window)
        term = cs.clamp(min=0) ** w[j]
        if j == scales - 1:
            term = term * lum.clamp(min=0) ** w[j]
        out = out * (F.interpolate(term, size=size, mode="bilinear", align_corners=False) if j else term)
        if j < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return out.mean(dim=1, keepdim=True)


def mse_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over channels: B×1×H×W."""
    return (x - y).pow(2).mean(dim=1, keepdim=True)


def patch_map(pixel_error: torch.Tensor, patch: int) -> torch.Tensor:
    """Patch-wise map: the mean error of each patch, spread over the patch's pixels. B×1×H×W → B×1×H×W."""
    return F.interpolate(F.avg_pool2d(pixel_error, patch), scale_factor=patch, mode="nearest")


def error_map(composite: torch.Tensor, images: torch.Tensor, score: str, *, scales: int = 5,
              window: int = 11) -> torch.Tensor:
    """Per-pixel reconstruction error B×1×H×W: 1 − MS-SSIM (``"ms-ssim"``) or the squared error (``"mse"``)."""
    if score == "ms-ssim":
        return 1 - ms_ssim_map(composite, images, scales=scales, window=window)
    if score == "mse":
        return mse_map(composite, images)
    raise ValueError(f"score must be 'ms-ssim' or 'mse', got {score!r}")


@torch.no_grad()
def seed_errors(model: MemMCMAE, images: torch.Tensor, *, seeds, scores=("ms-ssim",), scales: int = 5,
                window: int = 11):
    """For every mask seed in ``seeds``: ({score: error B×1×H×W}, pixel mask B×1×H×W, 1 = hidden)."""
    for s in seeds:
        _, composite, pix = model.reconstruct(images, generator=torch.Generator().manual_seed(int(s)))
        yield {k: error_map(composite, images, k, scales=scales, window=window) for k in scores}, pix


@torch.no_grad()
def seed_averaged_error(model: MemMCMAE, images: torch.Tensor, *, seeds: int, scores=("ms-ssim",), scales: int = 5,
                        window: int = 11, first_seed: int = 0) -> dict[str, torch.Tensor]:
    """Sec. 2.2: reconstruct with ``seeds`` different random masks (75 %); at each pixel, average the
    error over the masks that hid it. B×3×H×W → {score: pixel error B×1×H×W} (higher = more anomalous)."""
    total = {k: 0.0 for k in scores}
    count = 0.0
    for errors, pix in seed_errors(model, images, seeds=range(first_seed, first_seed + seeds), scores=scores,
                                   scales=scales, window=window):
        total = {k: total[k] + errors[k] * pix for k in scores}
        count = count + pix
    return {k: v / count.clamp(min=1) for k, v in total.items()}


# --------------------------------------------------------------------------- the detector interface

def _random_resized_crop(x: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop on a batch (aspect ratio 3/4–4/3), resized back to the input size: B×C×H×W."""
    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(*scale, generator=generator)
    logr = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    sw = (area * logr.exp()).sqrt().clamp(max=1.0)
    sh = (area / logr.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sh)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _stack_images(items: list[dict]) -> torch.Tensor:
    """collate_fn of the training loader: the items' images as one batch B×C×H×W (labels, masks dropped)."""
    return torch.stack([item["image"] for item in items])


DRY_RUN_BATCH = 2  # images per training batch in a dry run (uadkit.dryrun): 256 ViT-B images take many minutes on a CPU


class MemMCDetector(Detector):
    """MemMC-MAE behind the book's interface: ``fit`` trains from scratch on normal images with
    :func:`masked_mse`; ``predict`` gives patch-wise maps and their mean as the image score.

    Training reads the images batch by batch from the dataset (``config.batch_size`` per batch,
    shuffled with the detector's seed), so memory does not grow with the training set;
    ``num_workers`` data-loader processes read them (0: the main process). In a dry run
    (:mod:`uadkit.dryrun`) a batch holds at most :data:`DRY_RUN_BATCH` images.
    """

    name = "memmc_mae"
    num_workers = 0  # DataLoader workers that read the training images; set it to the profile's

    def __init__(self, config: MemMCConfig | None = None, *, pretrained: bool = True, **kw):
        super().__init__(**kw)  # ``pretrained`` is unused: the model trains from scratch
        self.config = config or MemMCConfig()
        self.model: MemMCMAE | None = None
        self.history: list[float] = []

    def _loss(self, model: MemMCMAE, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One training batch B×C×H×W → the masked-patch MSE (a float32 scalar, also under autocast).
        Crops and masks are drawn from ``generator`` (a CPU generator; the draws are moved to the images' device)."""
        if self.config.augment and model.training:
            images = _random_resized_crop(images, self.config.crop_scale, generator)
        keep, mask = random_masking(model.n_tokens, images.shape[0], self.config.mask_ratio, generator=generator,
                                    device=images.device)
        return masked_mse(model(images, keep), patchify(images, model.patch), mask)

    def _fit(self, train_loader, checkpoint=None) -> None:
        c = self.config
        torch.manual_seed(self.seed)
        dataset = train_loader.dataset  # read per batch below: the training set is never held in memory
        first = dataset[0]["image"]  # C×H×W
        self.model = MemMCMAE(image_size=first.shape[-1], config=c, channels=first.shape[0]).to(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        batch, micro = c.batch_size, c.micro_batch
        if dryrun.active() and batch > DRY_RUN_BATCH:
            batch = DRY_RUN_BATCH
            if micro is not None:  # scaled down with the batch, to 1 at least: the accumulation runs too
                micro = max(1, batch * micro // c.batch_size)
            dryrun.note(f"MemMC-MAE trains on batches of {batch} images in parts of {micro or batch} "
                        f"(the paper profile's: {c.batch_size} in parts of {c.micro_batch or c.batch_size})")
        data = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, generator=gen,
                                           collate_fn=_stack_images, num_workers=self.num_workers)
        opt = torch.optim.AdamW(self.model.parameters(), lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay)
        warm = max(1, c.warmup_epochs)  # linear warm-up, then half-cosine decay, per epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: (e + 1) / warm if e < warm else
                                                  0.5 * (1 + math.cos(math.pi * (e - warm) / max(1, c.epochs - warm))))
        self.history = train.fit(self.model, lambda m, b: self._loss(m, b, gen), data, epochs=c.epochs, optimizer=opt,
                                 scheduler=sched, device=self.device, checkpoint=checkpoint, desc="MemMC-MAE",
                                 progress=self.progress, micro_batch=micro)

    def pixel_error(self, images: torch.Tensor, *, seeds: int | None = None, scores=None,
                    first_seed: int = 0) -> dict[str, torch.Tensor]:
        """Seed-averaged reconstruction errors {score: B×1×H×W} (see :func:`seed_averaged_error`)."""
        c = self.config
        self.model.eval()
        return seed_averaged_error(self.model, images.to(self.device), seeds=seeds or c.mask_seeds,
                                   scores=tuple(scores or (c.score,)), scales=c.ssim_scales, window=c.ssim_window,
                                   first_seed=first_seed)

    @torch.no_grad()
    def predict_all(self, dataset, *, scores=("ms-ssim", "mse"), seeds: int | None = None):
        """Like ``predict`` but for several error measures from the same reconstructions:
        {score: (image scores N, patch-wise maps N×1×H×W)}."""
        out = {k: ([], []) for k in scores}
        for batch in torch.utils.data.DataLoader(dataset, batch_size=self.batch_size * 4,
                                                 collate_fn=lambda items: torch.stack([i["image"] for i in items])):
            for k, err in self.pixel_error(batch, seeds=seeds, scores=scores).items():
                maps = patch_map(err, self.config.patch).cpu()
                out[k][0].append(maps.flatten(1).mean(dim=1))
                out[k][1].append(maps)
        return {k: (torch.cat(s), torch.cat(m)) for k, (s, m) in out.items()}

    def _predict_batch(self, images):
        maps = patch_map(self.pixel_error(images)[self.config.score], self.config.patch)
        return maps.flatten(1).mean(dim=1), maps  # image score: the mean over patches
