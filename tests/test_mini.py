"""uadkit-mini and digits: deterministic, well-formed, train and test disjoint, held-out defects."""
import numpy as np
import pytest
import torch

from uadkit.data import UnknownDataset, get_dataset, loader, multiclass
from uadkit.data import defects as D
from uadkit.data import mini


@pytest.mark.parametrize("category", mini.MINI_CATEGORIES)
def test_category_is_well_formed(category):
    train = get_dataset(f"mini/{category}", "train", n_train=12, n_test=6, n_anomalous=6, image_size=32)
    test = get_dataset(f"mini/{category}", "test", n_train=12, n_test=6, n_anomalous=6, image_size=32)
    assert len(train) == 12 and len(test) == 12
    item = test[8]
    assert set(item) == {"image", "label", "mask", "category", "path"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 32)
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert set(torch.unique(test.masks).tolist()) <= {0.0, 1.0}
    assert train.labels.sum() == 0 and train.masks.sum() == 0
    assert list(test.labels) == [0] * 6 + [1] * 6
    # every anomalous image has a non-empty mask, every normal one an empty mask
    per_image = test.masks.flatten(1).sum(1)
    assert (per_image[6:] > 0).all() and (per_image[:6] == 0).all()
    assert item["category"] == f"mini/{category}"


def test_deterministic_and_seed_dependent():
    a = mini.mini("grass", "test", n_train=4, n_test=4, n_anomalous=4, image_size=32)
    b = mini.mini("grass", "test", n_train=4, n_test=4, n_anomalous=4, image_size=32)
    c = mini.mini("grass", "test", n_train=4, n_test=4, n_anomalous=4, image_size=32, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


def test_defect_changes_pixels_only_inside_its_mask():
    rng = np.random.default_rng(0)
    image = mini.mini("gravel", "train", n_train=1, image_size=64)[0]["image"]
    for kind in list(D.TEXTURE_DEFECTS) + list(D.MEDICAL_DEFECTS):
        out, mask = D.apply_defect(kind, image.clone(), rng)
        assert mask.sum() > 0, kind
        changed = (out - image).abs().amax(0, keepdim=True) > 1e-6
        assert not (changed & (mask == 0)).any(), f"{kind} changed pixels outside its mask"
        assert changed[mask > 0].float().mean() > 0.5, f"{kind}: most masked pixels should change"


def test_train_and_test_come_from_disjoint_regions():
    src = mini.source_image("brick")
    rng = np.random.default_rng(0)
    cut = int(mini._TRAIN_FRACTION * src.shape[-1])
    train_boxes = mini._crop_boxes("brick", src, "train", 50, rng)
    test_boxes = mini._crop_boxes("brick", src, "test", 50, rng)
    c = mini._CROP["brick"]
    assert all(x + c <= cut for _, x in train_boxes) and all(x >= cut for _, x in test_boxes)


def test_defect_kinds_are_balanced():
    test = mini.mini("brick", "test", n_train=1, n_test=2, n_anomalous=10, image_size=32)
    kinds = test.defects[2:]
    assert sorted(set(kinds)) == sorted(D.TEXTURE_DEFECTS) and all(kinds.count(k) == 2 for k in set(kinds))


def test_unknown_category_lists_valid_ones():
    with pytest.raises(UnknownDataset, match="brick"):
        get_dataset("mini/carpet", "train")
    with pytest.raises(UnknownDataset, match="kinds"):
        get_dataset("nonsense", "train")
    with pytest.raises(ValueError, match="split"):
        get_dataset("mini/brick", "validation")


def test_digits_one_vs_all():
    train, test = get_dataset("digits/3", "train"), get_dataset("digits/3", "test", image_size=32)
    assert train.labels.sum() == 0 and len(train) > 100
    assert test.labels.sum() * 2 == len(test)
    assert test[0]["image"].shape == (3, 32, 32) and not test.has_masks
    with pytest.raises(UnknownDataset, match="0..9"):
        get_dataset("digits/12", "train")


def test_multiclass_keeps_categories_and_batches():
    ds = multiclass(["mini/brick", "mini/retina"], "train", n_train=3, image_size=32)
    assert len(ds) == 6 and {ds[i]["category"] for i in range(6)} == {"mini/brick", "mini/retina"}
    batch = next(iter(loader(ds, batch_size=6)))
    assert batch["image"].shape == (6, 3, 32, 32) and batch["label"].tolist() == [0] * 6
    assert batch["path"] == [None] * 6 and len(batch["category"]) == 6
