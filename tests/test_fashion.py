"""fashion/<k>: IDX reading, the one-vs-all protocol, torchvision layout, and the error without files."""
import gzip

import numpy as np
import pytest

from uadkit.data import DatasetUnavailable, get_dataset
from uadkit.data import fashion as fm


def _write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    raw = tmp_path / "fashion" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28))
        images[:, 0, 0] = labels  # lets the test recover each image's class
        gz = prefix == "t10k"  # both plain and gzipped files are read
        _write_idx(raw / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}", images, gz=gz)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    fm._arrays.cache_clear()
    yield tmp_path
    fm._arrays.cache_clear()


def test_torchvision_layout_one_vs_all(fake_fashion):
    train = get_dataset("fashion/4", "train", root=fake_fashion, image_size=28)
    test = get_dataset("fashion/4", "test", root=fake_fashion, image_size=28)
    assert len(train) == 4 and train.labels.sum() == 0
    assert (np.round(train.images[:, 0, 0, 0].numpy() * 255) == 4).all()
    assert len(test) == 4 and list(test.labels) == [0, 0, 1, 1]
    classes = np.round(test.images[:, 0, 0, 0].numpy() * 255)
    assert (classes[:2] == 4).all() and (classes[2:] != 4).all()
    assert test[0]["image"].shape == (3, 28, 28) and not test.has_masks


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad-idx"
    _write_idx(path, np.zeros((3, 4, 4)))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(OSError, match="bad-idx"):
        fm.read_idx(path)


def test_missing_files_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    fm._arrays.cache_clear()
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        get_dataset("fashion/0", "train", root=tmp_path)
    fm._arrays.cache_clear()


@pytest.mark.skipif(not fm.DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (make setup installs it)")
def test_real_fashion_mnist_from_debian_package(tmp_path):
    fm._arrays.cache_clear()
    train = get_dataset("fashion/9", "train", root=tmp_path)
    test = get_dataset("fashion/9", "test", root=tmp_path)
    assert len(train) == 6000 and len(test) == 2000 and test.labels.sum() == 1000
    assert train[0]["image"].shape == (3, 32, 32)
