"""Detector.fit and predict refuse what no method can learn from, naming the item and the fix."""
import numpy as np
import pytest
import torch

import uadkit.models
from uadkit.data import ArrayDataset, get_dataset


def _set(images, labels=None):
    n = len(images)
    labels = np.zeros(n, np.int64) if labels is None else np.asarray(labels)
    return ArrayDataset(images, labels, None, category="x", name="x", has_masks=False)


def _det():
    return uadkit.models.create("knn", progress=False)


def _good(n=8):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_anomalous_training_items_are_refused():
    with pytest.raises(ValueError, match="2 of the 8 training items are labelled anomalous.*item 3"):
        _det().fit(_set(_good(), [0, 0, 0, 1, 0, 1, 0, 0]))


def test_images_in_0_255_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"item 0 has pixels from .* to 2\d\d.*divide by 255"):
        _det().fit(_set(_good() * 255))


def test_nan_images_are_refused_in_training_and_at_test_time():
    bad = _good()
    bad[7, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="training item 7 has NaN"):
        _det().fit(_set(bad))
    det = _det().fit(_set(_good()))
    with pytest.raises(ValueError, match="test item 7 has NaN"):
        det.predict(_set(bad))


def test_integer_images_are_refused():
    class Raw(torch.utils.data.Dataset):  # a user's own dataset handing out uint8 tensors
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": torch.full((3, 32, 32), 200, dtype=torch.uint8), "label": 0}

    with pytest.raises(ValueError, match="uint8.*divide by 255"):
        _det().fit(Raw())


def test_the_loaders_data_pass_and_anomem_may_train_on_anomalies():
    train = get_dataset("mini/brick", "train", n_train=8)
    assert _det().fit(train).predict(get_dataset("mini/brick", "test", n_test=4, n_anomalous=4))[0].shape == (8,)
    assert uadkit.models.create("anomem", progress=False).trains_on_anomalies


@pytest.mark.parametrize("method", ["knn", "adtr", "mdd_net"])
def test_layers_out_of_range_list_the_valid_stages(method):
    with pytest.raises(ValueError, match=r"layers=\(7,\): efficientnet_lite0 has 5 stages, indices 0..4"):
        uadkit.models.create(method, progress=False, layers=(7,)).fit(get_dataset("mini/brick", "train", n_train=4))


def test_create_validates_its_arguments():
    with pytest.raises(TypeError, match="seed must be an integer, got '0'"):
        uadkit.models.create("knn", seed="0")
    with pytest.raises(TypeError, match="batch_size must be a positive integer"):
        uadkit.models.create("knn", batch_size=0)
    with pytest.raises(TypeError, match="unknown setting.*foo.*settings of knn are: backbone, layers"):
        uadkit.models.create("knn", foo=1)
