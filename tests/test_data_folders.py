"""Real-dataset loaders on miniature fake trees: MVTec AD, VisA, MVTec-style folders, CIFAR-10/100."""
import csv
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from uadkit.data import DatasetUnavailable, UnknownDataset, get_dataset, multiclass
from uadkit.data import oneclass


def _png(path, value=128, size=16, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3) if mode == "RGB" else (size, size), value, np.uint8)
    Image.fromarray(arr).save(path)


def _mask(path, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size), np.uint8)
    arr[4:8, 4:8] = 255
    Image.fromarray(arr).save(path)


def make_mvtec_tree(root, with_gt=True, category_dir=None):
    base = category_dir or root / "mvtec" / "bottle"
    for i in range(3):
        _png(base / "train" / "good" / f"{i:03d}.png", 100 + i)
    _png(base / "test" / "good" / "000.png", 90, mode="L")  # grey → 3 channels
    for d in ("broken_large", "contamination"):
        _png(base / "test" / d / "000.png", 200)
        if with_gt:
            _mask(base / "ground_truth" / d / "000_mask.png")
    return base


def test_mvtec_layout(tmp_path):
    make_mvtec_tree(tmp_path)
    train = get_dataset("mvtec/bottle", "train", root=tmp_path, image_size=8)
    test = get_dataset("mvtec/bottle", "test", root=tmp_path, image_size=8)
    assert len(train) == 3 and train.labels.sum() == 0
    assert list(test.labels) == [1, 1, 0]  # sorted: broken_large, contamination, good
    item = test[0]
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (1, 8, 8) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert test[2]["mask"].sum() == 0 and test[2]["image"].shape == (3, 8, 8)
    assert item["category"] == "mvtec/bottle" and item["path"].endswith("000.png")


def test_mvtec_via_environment(tmp_path, monkeypatch):
    make_mvtec_tree(tmp_path)
    monkeypatch.setenv("UADKIT_DATA", str(tmp_path))
    assert len(get_dataset("mvtec/bottle", "test")) == 3


def test_mvtec_errors(tmp_path):
    with pytest.raises(UnknownDataset, match="bottle"):
        get_dataset("mvtec/bottel", "train", root=tmp_path)
    with pytest.raises(DatasetUnavailable, match="python -m uadkit.fetch mvtec --root"):
        get_dataset("mvtec/bottle", "train", root=tmp_path)
    base = make_mvtec_tree(tmp_path)
    (base / "ground_truth" / "contamination" / "000_mask.png").unlink()
    with pytest.raises(DatasetUnavailable, match="no ground-truth mask"):
        get_dataset("mvtec/bottle", "test", root=tmp_path)
    for f in (base / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(DatasetUnavailable, match="no images"):
        get_dataset("mvtec/bottle", "train", root=tmp_path)


def test_unreadable_file_is_named(tmp_path):
    base = make_mvtec_tree(tmp_path)
    (base / "train" / "good" / "001.png").write_bytes(b"not a png")
    ds = get_dataset("mvtec/bottle", "train", root=tmp_path)
    with pytest.raises(OSError, match="001.png"):
        ds[1]


def test_folder_with_and_without_ground_truth(tmp_path):
    make_mvtec_tree(tmp_path, category_dir=tmp_path / "brats_like")
    test = get_dataset(f"folder/{tmp_path / 'brats_like'}", "test", image_size=16)
    assert test.has_masks and test[0]["mask"].sum() == 16
    make_mvtec_tree(tmp_path, with_gt=False, category_dir=tmp_path / "data" / "no_masks")
    test = get_dataset("folder/no_masks", "test", root=tmp_path / "data", image_size=16)  # relative to root
    assert not test.has_masks and test.labels.sum() == 2 and test[0]["mask"].sum() == 0
    assert test[0]["category"] == "folder/no_masks"
    with pytest.raises(DatasetUnavailable, match="MVTec-style"):
        get_dataset("folder/does/not/exist", "test", root=tmp_path)


def test_visa_split_csv(tmp_path):
    visa = tmp_path / "visa"
    rows = []
    for split, label, n in (("train", "normal", 2), ("test", "normal", 1), ("test", "anomaly", 1)):
        for i in range(n):
            kind = "Normal" if label == "normal" else "Anomaly"
            img = f"candle/Data/Images/{kind}/{split}{i}.JPG"
            _png(visa / img)
            mask = ""
            if label == "anomaly":
                mask = f"candle/Data/Masks/Anomaly/{split}{i}.png"
                _mask(visa / mask)
            rows.append({"object": "candle", "split": split, "label": label, "image": img, "mask": mask})
    (visa / "split_csv").mkdir(parents=True)
    with open(visa / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
        w.writeheader()
        w.writerows(rows)
    assert len(get_dataset("visa/candle", "train", root=tmp_path)) == 2
    test = get_dataset("visa/candle", "test", root=tmp_path, image_size=16)
    assert list(test.labels) == [0, 1] and test[1]["mask"].sum() == 16
    with pytest.raises(DatasetUnavailable, match="no 'train' rows"):
        get_dataset("visa/pcb1", "train", root=tmp_path)
    with pytest.raises(DatasetUnavailable, match="python -m uadkit.fetch visa --root"):
        get_dataset("visa/candle", "train", root=tmp_path / "elsewhere")


def _cifar_batch(labels, key):
    data = np.zeros((len(labels), 3072), np.uint8)
    data[:, 0] = labels  # pixel (0,0) of the red channel holds the class, to check the protocol
    return {"data": data, key: list(labels)}


@pytest.fixture
def fake_cifar(tmp_path):
    c10 = tmp_path / "cifar10" / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    for i in range(1, 6):
        pickle.dump(_cifar_batch(np.arange(10).repeat(2), "labels"), open(c10 / f"data_batch_{i}", "wb"))
    pickle.dump(_cifar_batch(np.arange(10).repeat(3), "labels"), open(c10 / "test_batch", "wb"))
    c100 = tmp_path / "cifar100" / "cifar-100-python"
    c100.mkdir(parents=True)
    pickle.dump(_cifar_batch(np.arange(20).repeat(2), "coarse_labels"), open(c100 / "train", "wb"))
    pickle.dump(_cifar_batch(np.arange(20).repeat(2), "coarse_labels"), open(c100 / "test", "wb"))
    oneclass._arrays.cache_clear()
    yield tmp_path
    oneclass._arrays.cache_clear()


def test_cifar_one_vs_all(fake_cifar):
    train = get_dataset("cifar10/7", "train", root=fake_cifar)
    test = get_dataset("cifar10/7", "test", root=fake_cifar)
    assert len(train) == 10 and (train.images[:, 0, 0, 0] * 255).round().eq(7).all()
    assert list(test.labels) == [0, 0, 0, 1, 1, 1]
    cls = (test.images[:, 0, 0, 0] * 255).round()
    assert cls[:3].eq(7).all() and not cls[3:].eq(7).any()
    assert test[0]["image"].shape == (3, 32, 32) and not test.has_masks
    assert torch.equal(test.images, get_dataset("cifar10/7", "test", root=fake_cifar).images)  # seeded
    c100 = get_dataset("cifar100/19", "test", root=fake_cifar, image_size=16)
    assert len(c100) == 4 and c100[0]["image"].shape == (3, 16, 16) and c100[0]["category"] == "cifar100/19"
    with pytest.raises(UnknownDataset, match="0..19"):
        get_dataset("cifar100/20", "train", root=fake_cifar)


def test_cifar_missing_names_the_script(tmp_path):
    oneclass._arrays.cache_clear()
    with pytest.raises(DatasetUnavailable, match="python -m uadkit.fetch cifar --root"):
        get_dataset("cifar10/0", "train", root=tmp_path)


def test_multiclass_over_real_layout(tmp_path):
    make_mvtec_tree(tmp_path)
    make_mvtec_tree(tmp_path, category_dir=tmp_path / "mvtec" / "cable")
    ds = multiclass(["mvtec/bottle", "mvtec/cable"], "train", root=tmp_path, image_size=8)
    assert len(ds) == 6 and {ds[i]["category"] for i in range(6)} == {"mvtec/bottle", "mvtec/cable"}


def test_stack_gathers_masks_and_images_from_file_backed_and_array_datasets(tmp_path):
    import torch

    from uadkit.data import get_dataset, stack

    make_mvtec_tree(tmp_path)
    test = get_dataset("mvtec/bottle", "test", root=tmp_path, image_size=32)
    assert not hasattr(test, "masks")  # a FileDataset holds paths, not tensors
    masks, labels = stack(test, "mask"), stack(test, "label")
    assert masks.shape == (len(test), 1, 32, 32) and labels.tolist() == list(test.labels)
    assert stack(test, "image", indices=[1]).shape == (1, 3, 32, 32)
    mini = get_dataset("mini/brick", "test")
    assert torch.equal(stack(mini, "mask", indices=[0, 2]), mini.masks[[0, 2]])
