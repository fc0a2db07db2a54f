"""The methods of the book, one file each, all behind one interface.

>>> import uadkit.models
>>> uadkit.models.available()
['adtr', 'knn']
>>> det = uadkit.models.create("knn", profile="smoke")
>>> scores, maps = det.fit(train).predict(test)

A method is listed here once its chapter has landed.
"""
from __future__ import annotations

import dataclasses
import numbers

from ..profiles import get as get_profile
from .base import Detector

__all__ = ["Detector", "create", "available"]


def _knn(profile, overrides):
    from .knn import KNNConfig, KNNDetector

    return KNNConfig.for_profile(profile.name, **overrides), KNNDetector


def _adtr(profile, overrides):
    from .adtr import ADTRConfig, ADTRDetector

    return ADTRConfig.for_profile(profile.name, **overrides), ADTRDetector


def _memmc_mae(profile, overrides):
    from .memmc_mae import MemMCConfig, MemMCDetector

    return MemMCConfig.for_profile(profile.name, **overrides), MemMCDetector


def _mdd_net(profile, overrides):
    from .mdd_net import MDDConfig, MDDNetDetector

    return MDDConfig.for_profile(profile.name, **overrides), MDDNetDetector


def _anomem(profile, overrides):
    from .anomem import AnoMemConfig, AnoMemDetector

    return AnoMemConfig.for_profile(profile.name, **overrides), AnoMemDetector


def _qfae(profile, overrides):
    from .qfae import QFAEConfig, QFAEDetector

    return QFAEConfig.for_profile(profile.name, **overrides), QFAEDetector


_FACTORIES = {"knn": _knn, "adtr": _adtr, "memmc_mae": _memmc_mae, "qfae": _qfae, "anomem": _anomem,
              "mdd_net": _mdd_net}


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(_FACTORIES)


def create(name: str, profile: str = "smoke", *, device: str | None = None, batch_size: int | None = None,
           seed: int | None = None, progress: bool = True, pretrained: bool = True, **overrides) -> Detector:
    """A ready-to-fit detector of method ``name`` with the settings of ``profile``.

    ``overrides`` replace fields of the method's config dataclass (e.g. ``k=3``). ``batch_size`` is the
    batch of ``fit``'s data loader and of ``predict``; for a method whose detector class sets
    ``batch_size_trains = True`` (ADTR) it is also its training batch, ``config.batch_size``.
    """
    if name not in _FACTORIES:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(available())}")
    for key, value in (("seed", seed), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or
                                  (key == "batch_size" and value < 1)):
            raise TypeError(f"create({name!r}): {key} must be {'a positive' if key == 'batch_size' else 'an'} "
                            f"integer, got {value!r} ({type(value).__name__})")
    p = get_profile(profile)
    try:
        config, cls = _FACTORIES[name](p, overrides)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        fields = [f.name for f in dataclasses.fields(_FACTORIES[name](p, {})[0])]
        unknown = sorted(set(overrides) - set(fields))
        raise TypeError(f"create({name!r}): unknown setting(s) {', '.join(unknown)}; the settings of {name} are: "
                        f"{', '.join(fields)}") from None
    if batch_size is not None and getattr(cls, "batch_size_trains", False):
        config = dataclasses.replace(config, batch_size=batch_size)
    return cls(config, pretrained=pretrained, device=device or p.device, batch_size=batch_size or p.batch_size,
               seed=p.seed if seed is None else seed, progress=progress)
