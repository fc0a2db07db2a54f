"""One small interface for every method of the book.

>>> det = uadkit.models.create("knn", profile="smoke")
>>> det.fit(get_dataset("mini/brick", "train"))
>>> scores, maps = det.predict(get_dataset("mini/brick", "test"))   # N, N×1×H×W

A detector subclasses :class:`Detector` and implements ``_fit(loader)`` and
``_predict_batch(images) -> (scores B, maps B×1×H×W)``; the checks on the data
live here, once.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm import tqdm  # text bars: readable in terminals, notebooks, Colab and the rendered book

from .. import dryrun, metrics, train
from ..data.base import loader

__all__ = ["Detector", "check_images"]


def check_images(images: torch.Tensor, *, what: str, first_index: int = 0, paths=None) -> None:
    """Images must be float B×3×H×W, finite and in [0, 1] (what every loader of :mod:`uadkit.data` gives);
    otherwise a ValueError names the first bad item (its index from ``first_index``, and its file) and the fix."""
    def where(i):
        path = f" ({paths[i]})" if paths is not None and i < len(paths) and paths[i] else ""
        return f"{what} item {first_index + i}{path}"

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what}: images must be B×3×H×W, got {tuple(images.shape)}; grey images are repeated to "
                         "3 channels by the loaders of uadkit.data")
    if not images.is_floating_point():
        raise ValueError(f"{what}: images are {images.dtype}; convert them to float in [0, 1] (uint8: divide by 255)")
    if images.device.type == "meta":  # shapes only (uadkit.cost): nothing to check
        return
    flat = images.detach().flatten(1)
    bad = ~torch.isfinite(flat).all(1)
    if bad.any():
        raise ValueError(f"{where(int(bad.nonzero()[0]))} has NaN or infinite pixels; fix or drop that image")
    low, high = flat.min(1).values, flat.max(1).values
    bad = (low < -1e-3) | (high > 1 + 1e-3)
    if bad.any():
        i = int(bad.nonzero()[0])
        hint = " (0..255 values: divide by 255)" if high[i] > 2 else ""
        raise ValueError(f"{where(i)} has pixels from {low[i]:.3g} to {high[i]:.3g}; images must be in [0, 1]{hint}")


class Detector:
    """Base class: ``fit(train_dataset)`` then ``predict(test_dataset)``.

    The data are checked here, once for every method: ``fit`` looks at the labels of the whole training
    set (where it lists them) and at the images of up to :attr:`CHECKED_ITEMS` items spread over it;
    ``predict`` checks every batch (:func:`check_images`)."""

    name = "detector"
    trains_on_anomalies = False  # True for methods whose training set may hold labelled anomalies (AnoMem)
    CHECKED_ITEMS = 8

    def __init__(self, *, device: str = "cpu", batch_size: int = 32, seed: int = 0, progress: bool = True):
        self.device, self.batch_size, self.seed, self.progress = device, batch_size, seed, progress
        self.image_size: tuple[int, int] | None = None

    # -- what a method implements -------------------------------------------------------------
    def _fit(self, train_loader, checkpoint=None) -> None:
        raise NotImplementedError

    def _predict_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- the interface ---------------------------------------------------------------------------
    def fit(self, dataset, *, checkpoint=None) -> "Detector":
        """Learn normality from ``dataset``. Methods that train save their state to ``checkpoint``
        (a file path) after every epoch and resume from it when called again."""
        if len(dataset) == 0:
            raise ValueError(f"{self.name}: the training set is empty")
        self._check_training_set(dataset)
        self.image_size = tuple(dataset[0]["image"].shape[-2:])
        with train.fingerprint(self.fingerprint(dataset)):
            self._fit(loader(dataset, batch_size=self.batch_size, shuffle=False, seed=self.seed), checkpoint)
        return self

    def _check_training_set(self, dataset) -> None:
        labels = getattr(dataset, "labels", None)
        if labels is not None and not self.trains_on_anomalies:
            anomalous = np.flatnonzero(np.asarray(labels) != 0)
            if len(anomalous):
                raise ValueError(f"{self.name} trains on normal images only, but {len(anomalous)} of the {len(dataset)} "
                                 f"training items are labelled anomalous (the first is item {anomalous[0]}); "
                                 "pass the 'train' split, or only its label-0 items")
        n = len(dataset)
        for i in sorted({round(j * (n - 1) / max(1, self.CHECKED_ITEMS - 1)) for j in range(min(n, self.CHECKED_ITEMS))}):
            item = dataset[i]
            check_images(torch.as_tensor(item["image"])[None], what=f"{self.name}.fit: training", first_index=i,
                         paths=[item.get("path")])

    def fingerprint(self, dataset) -> dict:
        """The settings that shape a training run on ``dataset``; its checkpoints store them, and a
        checkpoint written under other settings is refused (:func:`uadkit.train.fingerprint`)."""
        config = getattr(self, "config", None)
        return {"method": self.name,
                "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
                "data": getattr(dataset, "name", type(dataset).__name__), "n_train": len(dataset),
                "image_size": list(self.image_size or ()), "batch_size": self.batch_size, "seed": self.seed,
                "dry_run": dryrun.active()}

    @torch.no_grad()
    def predict(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``N`` and anomaly maps ``N×1×H×W`` at input resolution; higher = more anomalous."""
        if self.image_size is None:
            raise RuntimeError(f"{self.name}: call fit() before predict()")
        if len(dataset) == 0:
            raise ValueError(f"{self.name}: the test set is empty")
        size = tuple(dataset[0]["image"].shape[-2:])
        if size != self.image_size:
            raise ValueError(f"{self.name}: test images are {size}, training images were {self.image_size}; "
                             "load both with the same image_size=")
        scores, maps, start = [], [], 0
        batches = loader(dataset, batch_size=self.batch_size)
        for batch in tqdm(batches, desc=f"{self.name} predict", disable=not self.progress, leave=False):
            check_images(batch["image"], what=f"{self.name}.predict: test", first_index=start, paths=batch.get("path"))
            start += len(batch["image"])
            s, m = self._predict_batch(batch["image"].to(self.device))
            scores.append(s.float().cpu())
            maps.append(m.float().cpu())
        return torch.cat(scores), torch.cat(maps)

    def evaluate(self, dataset, *, pixel: bool = True) -> dict[str, float]:
        """Predict on ``dataset`` and return image AUROC and, with ``pixel``, pixel AUROC and AUPRO."""
        if pixel and not getattr(dataset, "has_masks", True):
            raise ValueError(f"{getattr(dataset, 'name', 'this dataset')} has no ground-truth masks: "
                             "pixel metrics need them; call evaluate(..., pixel=False)")
        scores, maps = self.predict(dataset)
        labels = np.array([dataset[i]["label"] for i in range(len(dataset))])
        out = {"image AUROC": metrics.image_auroc(scores, labels)}
        if pixel:
            masks = torch.stack([dataset[i]["mask"] for i in range(len(dataset))])
            out["pixel AUROC"] = metrics.pixel_auroc(maps, masks)
            out["AUPRO"] = metrics.aupro(maps, masks)
        return out
