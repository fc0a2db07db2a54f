"""What an MVTec-style folder with real-world clutter loads as: hidden entries skipped, no anomalies in
train/, masks in the formats published sets use, masks checked against their images."""
import numpy as np
import pytest
from PIL import Image

from uadkit.data import folders, get_dataset
from uadkit.data.base import DatasetUnavailable, UnknownDataset, load_mask


def _png(path, size=(16, 16), value=128, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _tree(root, n_good=2, n_bad=2, mask_name="{stem}_mask.png"):
    for i in range(n_good):
        _png(root / f"train/good/{i:03d}.png")
        _png(root / f"test/good/{i:03d}.png")
    for i in range(n_bad):
        _png(root / f"test/crack/{i:03d}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 255
        path = root / "ground_truth/crack" / mask_name.format(stem=f"{i:03d}")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(path)
    return root


def test_hidden_folders_and_files_are_skipped(tmp_path):
    root = _tree(tmp_path / "set")
    for i in range(2):  # a notebook's checkpoint copies of good images, and macOS's AppleDouble files
        _png(root / f"test/.ipynb_checkpoints/{i:03d}.png")
        (root / f"test/good/._{i:03d}.png").write_bytes(b"\x00\x05\x16\x07 not an image")
        (root / f"train/good/._{i:03d}.png").write_bytes(b"\x00\x05\x16\x07")
    _png(root / "train/__MACOSX/000.png")
    test = get_dataset(f"folder/{root}", "test", image_size=16)
    assert len(test) == 4 and int(test.labels.sum()) == 2  # the checkpoints made it 6 with 4 anomalies
    assert len(get_dataset(f"folder/{root}", "train", image_size=16)) == 2


def test_anomalous_folders_under_train_are_refused(tmp_path):
    root = _tree(tmp_path / "set")
    _png(root / "train/crack/000.png")
    with pytest.raises(DatasetUnavailable, match="crack/"):
        get_dataset(f"folder/{root}", "train")


@pytest.mark.parametrize("mask_name", ["{stem}_mask.jpg", "{stem}.bmp", "{stem}_mask.PNG", "{stem}.tif"])
def test_masks_in_other_formats_are_found(tmp_path, mask_name):
    root = _tree(tmp_path / "set", mask_name=mask_name)
    item = get_dataset(f"folder/{root}", "test", image_size=16)[1]  # crack/ sorts before good/
    assert item["label"] == 1 and item["mask"].sum().item() == 16  # the 4×4 square, JPEG noise ignored


def test_a_mask_of_another_size_is_an_error_naming_both_files(tmp_path):
    root = _tree(tmp_path / "set")
    _png(root / "ground_truth/crack/001_mask.png", size=(20, 16), value=255)
    test = get_dataset(f"folder/{root}", "test", image_size=16)
    with pytest.raises(ValueError, match="001_mask.png is 20×16 pixels but its image .*001.png is 16×16"):
        test[1]


def test_non_square_images_keep_their_shape_without_image_size(tmp_path):
    root = tmp_path / "set"
    for split, sub in (("train", "good"), ("test", "good"), ("test", "crack")):
        _png(root / f"{split}/{sub}/000.png", size=(24, 16))
    _png(root / "ground_truth/crack/000_mask.png", size=(24, 16), value=255)
    item = folders.folder(str(root), "test", image_size=None)[0]  # None: each image at its own size
    assert item["image"].shape == (3, 16, 24) and item["mask"].shape == (1, 16, 24)


def test_transparency_marks_the_defect_in_rgba_masks(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, opaque only on the defect
    rgba[2:6, 2:6, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").sum().item() == 16  # was 256: the whole image
    opaque = np.zeros((16, 16, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[0:2, 0:2, :3] = 255  # an opaque RGBA mask: its grey value marks the defect
    Image.fromarray(opaque, "RGBA").save(tmp_path / "o.png")
    assert load_mask(tmp_path / "o.png").sum().item() == 4


def test_folder_without_a_path_is_refused():
    with pytest.raises(UnknownDataset, match="needs the path"):
        get_dataset("folder/", "test")
