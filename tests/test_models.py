"""The one detector interface, exercised with the kNN baseline."""
import numpy as np
import pytest
import torch

import uadkit.models
from uadkit import metrics
from uadkit.data import ArrayDataset, get_dataset
from uadkit.models.knn import KNNConfig, anomaly_map, image_score


def _small(name, split, size=32, **kw):
    return get_dataset(name, split, image_size=size, **kw)


def test_available_and_unknown():
    assert "knn" in uadkit.models.available()
    with pytest.raises(KeyError, match="available"):
        uadkit.models.create("nope")


def test_knn_fit_predict_on_mini_finds_anomalies():
    kw = dict(n_train=40, n_test=20, n_anomalous=20)
    det = uadkit.models.create("knn", progress=False)
    det.fit(_small("mini/brick", "train", **kw))
    test = _small("mini/brick", "test", **kw)
    scores, maps = det.predict(test)
    assert scores.shape == (40,) and maps.shape == (40, 1, 32, 32)
    assert metrics.image_auroc(scores, test.labels) > 0.8
    assert metrics.pixel_auroc(maps, test.masks) > 0.8


def test_knn_on_fashion_one_vs_all():
    pytest.importorskip("uadkit.data.fashion")
    from uadkit.data import fashion

    if not fashion.DEBIAN_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    train = _small("fashion/1", "train")
    train = torch.utils.data.Subset(train, range(100))
    test = _small("fashion/1", "test")
    test = ArrayDataset(test.images[::20], test.labels[::20], None, category="fashion/1", name="fashion/1", has_masks=False)
    det = uadkit.models.create("knn", progress=False).fit(train)
    scores, maps = det.predict(test)
    assert metrics.image_auroc(scores, test.labels) > 0.7  # trousers vs everything else


def test_bad_input_is_reported():
    det = uadkit.models.create("knn", progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        det.predict(_small("mini/brick", "test", n_train=4, n_test=2, n_anomalous=2))
    with pytest.raises(ValueError, match="empty"):
        det.fit(torch.utils.data.Subset(_small("mini/brick", "train", n_train=4), []))
    det.fit(_small("mini/brick", "train", n_train=4))
    with pytest.raises(ValueError, match="image_size"):
        det.predict(get_dataset("mini/brick", "test", image_size=48, n_train=4, n_test=2, n_anomalous=2))


def test_overrides_and_profiles():
    det = uadkit.models.create("knn", layers=(2,), max_bank=123, progress=False)
    assert det.config.layers == (2,) and det.config.max_bank == 123
    assert KNNConfig.for_profile("paper").backbone == "wide_resnet50_2"
    with pytest.raises(TypeError):
        uadkit.models.create("knn", not_a_field=1)


def test_anomaly_map_and_score_by_hand():
    d = torch.zeros(1, 1, 2, 2)
    d[0, 0, 1, 1] = 4.0
    m = anomaly_map(d, (4, 4), sigma=0)
    assert m.shape == (1, 1, 4, 4) and m[0, 0, 3, 3] == 4.0 and m[0, 0, 0, 0] == 0.0
    assert image_score(m).tolist() == [4.0]


def test_memory_bank_distance_is_exact():
    """A test image equal to a training image is at distance ≈ 0 everywhere (cdist's matmul form
    leaves rounding of about 1e-3 of the feature norm)."""
    train = _small("mini/retina", "train", n_train=3)
    det = uadkit.models.create("knn", progress=False).fit(train)
    x = train[1]["image"][None]
    d = det.model(x)
    norm = det.model.embed(x).norm(dim=1).mean()
    assert d.max() < 2e-3 * norm


def test_knn_on_a_user_folder_tree(tmp_path):
    """Any MVTec-style tree a user brings works through the same interface."""
    from test_data_folders import make_mvtec_tree

    tree = make_mvtec_tree(tmp_path, category_dir=tmp_path / "my_parts")
    train = get_dataset(f"folder/{tree}", "train", image_size=32)
    test = get_dataset(f"folder/{tree}", "test", image_size=32)
    det = uadkit.models.create("knn", progress=False).fit(train)
    scores, maps = det.predict(test)
    assert scores.shape == (3,) and maps.shape == (3, 1, 32, 32)
    assert scores[:2].min() > scores[2]  # the two bright "defect" images differ most from the train images
    result = det.evaluate(test)
    assert set(result) == {"image AUROC", "pixel AUROC", "AUPRO"} and result["image AUROC"] == 1.0


def test_evaluate_without_masks_is_a_clear_error():
    det = uadkit.models.create("knn", progress=False).fit(_small("digits/0", "train"))
    with pytest.raises(ValueError, match="no ground-truth masks"):
        det.evaluate(_small("digits/0", "test"))
    assert 0.5 < det.evaluate(_small("digits/0", "test"), pixel=False)["image AUROC"] <= 1.0


@pytest.mark.parametrize("max_bank", [100, 10_000])
def test_memory_bank_is_the_seeded_subset_of_all_patches(max_bank):
    """Filled batch by batch, the bank is exactly what subsampling all patches at once gives:
    ``randperm(n_patches)[:max_bank]`` with the detector's seed (or every patch, in order, below the cap)."""
    train = _small("mini/brick", "train", n_train=10)
    det = uadkit.models.create("knn", progress=False, max_bank=max_bank, batch_size=3).fit(train)
    with torch.no_grad():
        f = det.model.embed(torch.stack([train[i]["image"] for i in range(len(train))]))
    every = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    if len(every) > max_bank:
        every = every[torch.randperm(len(every), generator=torch.Generator().manual_seed(det.seed))[:max_bank]]
    assert det.model.bank.shape == every.shape and torch.allclose(det.model.bank, every, atol=1e-5)


def test_fit_and_prediction_on_the_meta_device():
    """Bank building and prediction create nothing on the CPU (a CPU tensor next to a meta one would raise)."""
    from uadkit import backbones
    from uadkit.models.knn import KNNModel

    det = uadkit.models.create("knn", profile="paper", pretrained=False, progress=False, max_bank=300)
    net = backbones.create(det.config.backbone, pretrained=False).to("meta")  # a private copy on meta
    det.model = KNNModel(backbone=net, layers=det.config.layers, pool=det.config.pool).to("meta")
    det.device = "meta"

    class Batches(list):
        dataset = range(4)

    det._fit(Batches([{"image": torch.ones(2, 3, 256, 256, device="meta")}] * 2))
    assert det.model.bank.shape == (300, 512 + 1024) and det.model.bank.device.type == "meta"
    scores, maps = det._predict_batch(torch.ones(2, 3, 256, 256, device="meta"))
    assert scores.shape == (2,) and maps.shape == (2, 1, 256, 256) and maps.device.type == "meta"


@pytest.mark.paper_memory
def test_fit_memory_does_not_grow_with_the_training_set(tmp_path):
    """A paper-profile fit at 256 px with a bank capped at 2,000 patches. The old fit kept every patch of
    every image before subsampling (here EfficientNet-Lite0's stride-4 and -8 stages, 64 channels on
    64×64: 1 MB per image, +110 MB from 16 to 128 images; with the paper's WideResNet-50 it is 6 MB per
    image, but 12 times slower to run); now only the kept patches are stored. Margin: 60 MB."""
    from memory import fit_peaks_mb

    small, large = fit_peaks_mb("knn", (16, 128), tmp_path, max_bank=2000, backbone="efficientnet_lite0",
                                layers=(1, 2))
    assert large - small < 60, f"peak memory grew from {small:.0f} MB (16 images) to {large:.0f} MB (128 images)"
