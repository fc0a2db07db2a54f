"""The two ways every chapter runs: ``smoke`` and ``paper``.

A chapter's first code cell is tagged ``parameters`` and holds
``profile = "smoke"``; papermill (or a reader) changes that one string and
nothing else::

    papermill book/adtr.ipynb out.ipynb -p profile paper

``smoke``  the embedded ``uadkit-mini`` data, small images, ``efficientnet_lite0``
           standing in for every frozen pretrained network, few epochs, CPU; a
           chapter runs in one to three minutes.
``paper``  real datasets under ``$UADKIT_DATA`` in their published layouts, the
           paper's backbone, image size and schedule, on a GPU when there is one.

A second parameter, ``dry_run = False``, runs the paper profile's every cell on fake
trees with a few steps per training (:mod:`uadkit.dryrun`)::

    papermill book/adtr.ipynb out.ipynb -p profile paper -p dry_run True

A third, ``categories = None``, restricts a run to some of its datasets or categories, by the
names :func:`uadkit.data.get_dataset` knows, or their last part (one MVTec AD category on a
free GPU, say)::

    papermill book/adtr.ipynb out.ipynb -p profile paper -y "categories: [bottle]"

The profile holds what all chapters share; a chapter keeps its own method
settings in a dataclass with one constructor per profile.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .data.folders import MVTEC_CATEGORIES
from .data.mini import MEDICAL, MINI_CATEGORIES, TEXTURES

__all__ = ["Profile", "get", "pick_device", "gpu_memory_gb", "PROFILES"]


def pick_device(preferred: str | None = None) -> str:
    """``preferred`` if given, else the best device here: cuda > mps > cpu."""
    import torch

    if preferred:
        return preferred
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def gpu_memory_gb(device: str) -> float:
    """The memory of the CUDA GPU ``device`` in GB (a 16 GB T4 on Colab's free tier), or infinity for
    any other device, where a chapter need not shrink its batches' parts to fit."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return float("inf")
    return torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9


@dataclass(frozen=True)
class Profile:
    """Settings shared by every chapter under one profile."""

    name: str
    image_size: int  # square input size in pixels
    backbone: str  # the frozen CNN that stands in where a paper names none of its own
    categories: tuple[str, ...]  # dataset names for per-category tables (get_dataset names)
    textures: tuple[str, ...]  # the texture subset of ``categories``
    one_vs_all: tuple[str, ...]  # semantic one-vs-all datasets (CIFAR-10 protocol)
    batch_size: int
    num_workers: int
    device: str = ""
    seed: int = 0
    dry_run: bool = False  # the paper code path on fake trees, a few steps per training (uadkit.dryrun)
    only: tuple[str, ...] = ()  # a subset of the datasets / categories to run (empty: all); see pick()

    def __post_init__(self):
        if not self.device:
            object.__setattr__(self, "device", pick_device())

    @property
    def is_smoke(self) -> bool:
        return self.name == "smoke"

    @property
    def small_gpu(self) -> bool:
        """True for the ``paper`` profile on a CUDA GPU under 20 GB (Colab's 16 GB T4), where a chapter
        trains its largest batches in parts (or smaller) so that one step fits; False on any other device."""
        return not self.is_smoke and gpu_memory_gb(self.device) < 20

    def head(self, items, n: int | None = None):
        """``items`` as they are, or their first few in a dry run (a table's categories, a sweep's values)."""
        from .dryrun import MAX_ITEMS

        if not self.dry_run:
            return items
        n = n or MAX_ITEMS
        return dict(list(items.items())[:n]) if isinstance(items, dict) else items[:n]

    def pick(self, names, *, required: bool = False):
        """``names`` (a list, tuple or dict keyed by dataset names) restricted to the profile's subset
        ``only``; all of them when there is none. A name is kept when it equals an entry of ``only``, or its
        part after the first "/" does (``"bottle"`` keeps ``"mvtec/bottle"``), or its part before it does
        (``"cifar10"`` keeps every ``"cifar10/<k>"``). ``required``: raise when nothing is left.

        >>> get("paper", only=("bottle",)).pick(["mvtec/bottle", "mvtec/cable"])
        ['mvtec/bottle']
        """
        kept = [n for n in names if not self.only or _matches(n, self.only)]
        if required and not kept:
            raise ValueError(f"categories={list(self.only)} selects none of {', '.join(map(str, names))}; "
                             "name one of these (or its part after the '/'), or None for all")
        if isinstance(names, dict):
            return {n: names[n] for n in kept}
        return type(names)(kept) if isinstance(names, tuple) else kept

    def seeds(self, first: int = 0, n: int = 3) -> list[int]:
        """The training seeds of a compared model: ``first``, ``first + 1``, … (``n`` of them), or
        two in a dry run (the fewest an interval over seeds takes), so every cell still runs.

        >>> get("smoke").seeds(0)
        [0, 1, 2]
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"an interval over seeds needs at least 2 seeds, got n_seeds={n!r}")
        return list(range(first, first + (2 if self.dry_run else n)))


def _matches(name, only) -> bool:
    name = str(name)
    return any(o in (name, name.split("/", 1)[-1], name.split("/", 1)[0]) for o in only)


PROFILES = {
    "smoke": Profile(
        name="smoke",
        image_size=64,
        backbone="efficientnet_lite0",
        categories=tuple(f"mini/{c}" for c in MINI_CATEGORIES),
        textures=tuple(f"mini/{c}" for c in TEXTURES),
        one_vs_all=tuple(f"fashion/{k}" for k in range(10)),  # digits/<k> is the lighter fallback
        batch_size=32,
        num_workers=0,
        device="cpu",
    ),
    "paper": Profile(
        name="paper",
        image_size=256,
        backbone="efficientnet_b4",
        categories=tuple(f"mvtec/{c}" for c in MVTEC_CATEGORIES),
        textures=tuple(f"mvtec/{c}" for c in ("carpet", "grid", "leather", "tile", "wood")),
        one_vs_all=tuple(f"cifar10/{k}" for k in range(10)),
        batch_size=8,
        num_workers=4,
    ),
}

MEDICAL_SMOKE = tuple(f"mini/{c}" for c in MEDICAL)


def _dry(p: Profile) -> Profile:
    """The dry-run version of ``p``: one object and one (grey, for MVTec) texture category, two classes."""
    from . import dryrun

    dryrun.enable()
    # the subset's first object and texture where it names categories; else one object, the grey texture
    chosen = [c for c in p.categories if _matches(c, p.only)] if p.only else []
    if chosen:
        texture = next((t for t in chosen if t in p.textures), None)
        obj = next((c for c in chosen if c not in p.textures), None)
    else:
        texture = next((t for t in p.textures if t.endswith("/grid")), p.textures[0])
        obj = next(c for c in p.categories if c not in p.textures)
    keep = tuple(c for c in (obj, texture) if c)
    return dataclasses.replace(p, categories=keep, textures=keep[-1:] if texture else (),
                               one_vs_all=p.one_vs_all[:dryrun.MAX_ITEMS], num_workers=0)


def _only(p: Profile, only) -> Profile:
    """``p`` with the subset ``only`` (None or empty: all), which the chapters apply with :meth:`Profile.pick`."""
    if only is None or (not isinstance(only, str) and len(only) == 0):
        return p
    return dataclasses.replace(p, only=(only,) if isinstance(only, str) else tuple(str(o) for o in only))


def get(profile: str = "smoke", *, dry_run: bool = False, only=None, **overrides) -> Profile:
    """The settings of ``profile`` ("smoke" or "paper"), with any field overridden.

    ``dry_run=True`` switches :mod:`uadkit.dryrun` on (fake trees, a few steps per training,
    bf16 autocast on the CPU too) and keeps two categories per table. ``only`` (a chapter's
    ``categories`` parameter) names a subset of the datasets, which the chapter's tables keep
    through :meth:`Profile.pick`.

    >>> get("smoke").image_size
    64
    >>> get("paper", device="cpu").device
    'cpu'
    """
    if not isinstance(dry_run, bool):
        raise TypeError(f"dry_run must be True or False, got {dry_run!r}")
    if isinstance(profile, Profile):
        p = _only(dataclasses.replace(profile, **overrides) if overrides else profile, only)
        return _dry(dataclasses.replace(p, dry_run=True)) if dry_run and not p.dry_run else p
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    p = PROFILES[profile]
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(Profile)}
        if unknown:
            raise TypeError(f"unknown profile settings {sorted(unknown)}")
        p = dataclasses.replace(p, **overrides)
    p = _only(p, only)
    return _dry(dataclasses.replace(p, dry_run=True)) if dry_run else p
