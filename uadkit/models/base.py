"""One small interface for every method of the book.

>>> det = uadkit.models.create("knn", profile="smoke")
>>> det.fit(get_dataset("mini/brick", "train"))
>>> scores, maps = det.predict(get_dataset("mini/brick", "test"))   # N, N×1×H×W

A detector subclasses :class:`Detector` and implements ``_fit(loader)`` and
``_predict_batch(images) -> (scores B, maps B×1×H×W)``; the checks on the data
live here, once.
"""
from __future__ import annotations

import torch
from tqdm import tqdm  # text bars: readable in terminals, notebooks, Colab and the rendered book

from ..data.base import loader

__all__ = ["Detector"]


class Detector:
    """Base class: ``fit(train_dataset)`` then ``predict(test_dataset)``."""

    name = "detector"

    def __init__(self, *, device: str = "cpu", batch_size: int = 32, seed: int = 0, progress: bool = True):
        self.device, self.batch_size, self.seed, self.progress = device, batch_size, seed, progress
        self.image_size: tuple[int, int] | None = None

    # -- what a method implements -------------------------------------------------------------
    def _fit(self, train_loader) -> None:
        raise NotImplementedError

    def _predict_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- the interface ---------------------------------------------------------------------------
    def fit(self, dataset) -> "Detector":
        if len(dataset) == 0:
            raise ValueError(f"{self.name}: the training set is empty")
        self.image_size = tuple(dataset[0]["image"].shape[-2:])
        self._fit(loader(dataset, batch_size=self.batch_size, shuffle=False, seed=self.seed))
        return self

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
        scores, maps = [], []
        batches = loader(dataset, batch_size=self.batch_size)
        for batch in tqdm(batches, desc=f"{self.name} predict", disable=not self.progress, leave=False):
            s, m = self._predict_batch(batch["image"].to(self.device))
            scores.append(s.float().cpu())
            maps.append(m.float().cpu())
        return torch.cat(scores), torch.cat(maps)
