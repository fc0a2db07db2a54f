"""uadkit.data.fake: the fake trees are read by the real loaders, look like the real sets on disk
(layouts, formats, image modes, completion markers), and are built deterministically, once."""
import csv
import json
import pickle
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uadkit.data import UnknownDataset, fake, get_dataset
from uadkit.data.folders import MVTEC_CATEGORIES, VISA_CATEGORIES
from uadkit.fetch import bmad, covidx

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake-data")
    start = time.process_time()  # CPU time: the bound holds on a busy machine too
    assert fake.build_all(root) == root
    return root, time.process_time() - start


@pytest.fixture
def root(built):
    return built[0]


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_all_is_fast_and_complete(built):
    root, seconds = built
    assert seconds < 10, f"build_all took {seconds:.1f} s of CPU"  # about 3.5 s here
    for kind in fake.KINDS:
        meta = json.loads((root / kind / fake.MARKER).read_text())
        assert meta["kind"] == kind and meta["seed"] == 0 and "FAKE" in meta["note"]
    assert not list(root.glob(".*.building"))


# name, whether the test split has pixel masks
CASES = [("mvtec/grid", True), ("mvtec/bottle", True), ("visa/candle", True), ("visa/pcb4", True),
         ("cifar10/0", False), ("cifar100/3", False), ("bmad/brats2021", True), ("bmad/liverct", True),
         ("bmad/liverct-roi", True), ("bmad/resc", True), ("bmad/rsna", False), ("covidx/all", False),
         ("hyper-kvasir/all", True), ("cub200/0", False), ("cub200/199", False)]


@pytest.mark.parametrize("name,masks", CASES, ids=[c[0] for c in CASES])
def test_real_loaders_read_the_fake_trees(root, name, masks):
    train, test = get_dataset(name, "train", root=root), get_dataset(name, "test", root=root)
    assert len(train) >= 2 and train.labels.sum() == 0
    assert set(test.labels.tolist()) == {0, 1}
    items = [train[i] for i in (0, 1, len(train) - 1)] + [test[i] for i in range(len(test))]
    size = items[0]["image"].shape[-1]
    for item in items:
        image, mask = item["image"], item["mask"]
        assert image.dtype == torch.float32 and image.shape == (3, size, size)
        assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.02  # structure, not a flat image
        assert mask.shape == (1, size, size) and set(mask.unique().tolist()) <= {0.0, 1.0}
        if item["label"] == 1 and masks:
            assert mask.sum() > 0, item["path"]
        else:
            assert mask.sum() == 0, item["path"]
    assert getattr(test, "has_masks", False) == masks


@pytest.mark.parametrize("name", ["mvtec/bottle", "mvtec/grid", "mvtec/screw", "visa/candle", "bmad/brats2021",
                                  "bmad/resc"])
def test_each_defect_is_where_its_mask_is(root, name):
    train, test = get_dataset(name, "train", root=root, image_size=64), get_dataset(name, "test", root=root,
                                                                                     image_size=64)
    normal = torch.stack([train[i]["image"] for i in range(len(train))]).mean(0)
    for item in (test[i] for i in range(len(test))):
        if item["label"]:
            diff, m = (item["image"] - normal).abs().mean(0), item["mask"][0] > 0
            assert diff[m].mean() > 0.25 and diff[m].mean() > 3 * diff[~m].mean(), item["path"]


def test_mvtec_on_disk(root):
    base = root / "mvtec"
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == sorted(MVTEC_CATEGORIES)
    assert (base / ".uadkit-complete").is_file()  # what uadkit.fetch leaves in an unpacked tree
    for cat in MVTEC_CATEGORIES:
        mode = "L" if cat in ("grid", "screw", "zipper") else "RGB"
        images = sorted((base / cat).glob("t*/*/*.png"))
        assert len(list((base / cat / "train" / "good").glob("*.png"))) >= 4
        defects = [d for d in (base / cat / "test").iterdir() if d.name != "good"]
        assert len(defects) == (1 if cat == "toothbrush" else 2)  # real defect names; toothbrush has one
        for p in images:
            with Image.open(p) as im:
                assert im.format == "PNG" and im.mode == mode, p
        for d in defects:
            for img in d.glob("*.png"):
                mask = base / cat / "ground_truth" / d.name / f"{img.stem}_mask.png"
                with Image.open(mask) as im:
                    assert im.mode == "L" and set(np.unique(np.asarray(im)).tolist()) == {0, 255}
                    assert im.size == Image.open(img).size
    assert (base / "bottle" / "test" / "broken_large").is_dir()


def test_visa_on_disk(root):
    base = root / "visa"
    with open(base / "split_csv" / "1cls.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["object", "split", "label", "image", "mask"]
    assert {r["object"] for r in rows} == set(VISA_CATEGORIES)
    assert {(r["split"], r["label"]) for r in rows} == {("train", "normal"), ("test", "normal"), ("test", "anomaly")}
    for r in rows:
        with Image.open(base / r["image"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and r["image"].endswith(".JPG")
        assert bool(r["mask"]) == (r["label"] == "anomaly")
        if r["mask"]:
            with Image.open(base / r["mask"]) as im:
                assert im.format == "PNG" and im.mode == "L" and np.asarray(im).max() > 0
    assert (base / "candle" / "image_anno.csv").is_file() and (base / ".uadkit-complete").is_file()


def _load(path, encoding):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open(path, "rb") as f:
            return pickle.load(f, encoding=encoding)


def test_cifar_pickles_are_like_the_python2_originals(root):
    c10, c100 = root / "cifar10" / "cifar-10-batches-py", root / "cifar100" / "cifar-100-python"
    for path, key in [(c10 / f"data_batch_{i}", "labels") for i in range(1, 6)] + [(c10 / "test_batch", "labels"),
                                                                                     (c100 / "train", "fine_labels"),
                                                                                     (c100 / "test", "fine_labels")]:
        batch = _load(path, "latin1")  # str keys, as oneclass._unpickle and torchvision read them
        assert {"data", key, "filenames", "batch_label"} <= set(batch)
        assert batch["data"].dtype == np.uint8 and batch["data"].shape == (len(batch[key]), 3072)
        assert isinstance(batch["batch_label"], str) and all(isinstance(f, str) for f in batch["filenames"])
        raw = _load(path, "bytes")  # the CIFAR page's own recipe: bytes keys
        assert b"data" in raw and np.array_equal(raw[b"data"], batch["data"])
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in path.read_bytes()  # as numpy 1 under Python 2 wrote it
    train = np.concatenate([_load(c10 / f"data_batch_{i}", "latin1")["labels"] for i in range(1, 6)])
    test = _load(c10 / "test_batch", "latin1")["labels"]
    assert set(train) == set(test) == set(range(10)) and np.bincount(test).min() >= 2
    assert len(_load(c10 / "batches.meta", "latin1")["label_names"]) == 10
    tr100, te100 = _load(c100 / "train", "latin1"), _load(c100 / "test", "latin1")
    for b in (tr100, te100):
        assert set(b["fine_labels"]) == set(range(100)) and set(b["coarse_labels"]) == set(range(20))
    meta = _load(c100 / "meta", "latin1")
    assert len(meta["fine_label_names"]) == 100 and meta["coarse_label_names"][0] == "aquatic_mammals"
    assert all((root / k / ".uadkit-complete").is_file() for k in ("cifar10", "cifar100"))


def test_bmad_on_disk(root):
    base = root / "bmad"
    for folder, masked in bmad.SETS.items():
        assert bmad.check(root, folder) is None  # the command's own layout check
        for img in (base / folder).glob("*/*/img/*"):
            with Image.open(img) as im:
                assert im.format == "PNG" and im.mode == "L", img
            label = img.parent.parent / "label" / img.name
            assert label.is_file() == (masked and img.parts[-4] != "train"), img
        assert (base / folder / "valid" / "Ungood" / "img").is_dir()
    roi = base / "Liver_roi"
    assert (roi / ".uadkit-complete").is_file()  # written by uadkit.fetch.bmad's liver_roi
    with Image.open(next((roi / "test" / "Ungood" / "img").iterdir())) as im:
        assert im.size == (224, 224) and im.mode == "L"


def test_the_bmad_command_writes_the_same_liver_roi(root, tmp_path, capsys):
    """The fake tree's Liver_roi is what ``python -m uadkit.fetch bmad --liver-roi`` writes from its Liver."""
    shutil.copytree(root / "bmad" / "Liver", tmp_path / "bmad" / "Liver")
    bmad.main(["--root", str(tmp_path), "--liver-roi"])
    assert "Liver  ready" in capsys.readouterr().out
    got, want = _files(tmp_path / "bmad" / "Liver_roi"), _files(root / "bmad" / "Liver_roi")
    assert list(got) == list(want)
    assert all(got[k].read_bytes() == want[k].read_bytes() for k in got)


def test_covidx_on_disk(root):
    assert covidx.check(root) is None
    base = root / "covidx"
    for split in ("train", "test"):
        lines = [line.split() for line in (base / f"{split}.txt").read_text().splitlines()]
        assert all(len(p) == 4 and p[2] in ("positive", "negative") for p in lines)
        assert {p[2] for p in lines} == {"positive", "negative"}
        for p in lines:
            with Image.open(base / split / p[1]) as im:
                assert im.mode == "L" and im.format in ("PNG", "JPEG")


def test_hyper_kvasir_on_disk(root):
    base = root / "hyper-kvasir"
    labeled = base / "labeled" / "labeled-images" / "lower-gi-tract"
    normal = [p for d in ("anatomical-landmarks/cecum", "anatomical-landmarks/ileum",
                          "quality-of-mucosal-views/bbps-2-3") for p in (labeled / d).glob("*.jpg")]
    assert len(normal) > 1600  # the loader's n_train, plus a few for its test split
    train, test = (get_dataset("hyper-kvasir/all", split, root=root) for split in ("train", "test"))
    assert len(train) + int((test.labels == 0).sum()) == len(normal)  # bbps-0-1 and polyps/ are not normal
    seg = base / "segmented" / "segmented-images"
    for img in (seg / "images").glob("*.jpg"):
        with Image.open(seg / "masks" / img.name) as m, Image.open(img) as im:
            assert m.format == "JPEG" and m.mode == "RGB" and m.size == im.size and im.mode == "RGB"
    assert set(json.loads((seg / "bounding-boxes.json").read_text())) == {p.stem for p in (seg / "images").glob("*")}
    assert all((base / part / ".uadkit-complete").is_file() for part in ("labeled", "segmented"))


def test_cub_on_disk(root):
    base = root / "cub200" / "CUB_200_2011"
    classes = (base / "classes.txt").read_text().splitlines()
    assert len(classes) == 200 and classes[0] == "1 001.Black_footed_Albatross"
    assert classes[-1] == "200 200.Common_Yellowthroat"
    images = dict(line.split() for line in (base / "images.txt").read_text().splitlines())
    label = dict(line.split() for line in (base / "image_class_labels.txt").read_text().splitlines())
    split = dict(line.split() for line in (base / "train_test_split.txt").read_text().splitlines())
    assert set(images) == set(label) == set(split)
    for c in range(1, 201):
        ids = [i for i in images if label[i] == str(c)]
        assert {split[i] for i in ids} == {"0", "1"}  # at least one train and one test image per class
        assert all(images[i].startswith(classes[c - 1].split()[1] + "/") for i in ids)
    with Image.open(base / "images" / images["1"]) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
    assert (root / "cub200" / ".uadkit-complete").is_file()


def test_second_build_all_is_fast_and_changes_nothing(root):
    before = {k: (p.stat().st_size, p.stat().st_mtime_ns) for k, p in _files(root).items()}
    start = time.process_time()
    fake.build_all(root)
    assert time.process_time() - start < 0.5  # a few marker files read, nothing written
    assert {k: (p.stat().st_size, p.stat().st_mtime_ns) for k, p in _files(root).items()} == before


def test_same_seed_same_bytes(root, tmp_path):
    for kind in ("visa", "cifar10"):
        again = _files(fake.build(kind, tmp_path / "a", seed=0))
        first = _files(root / kind)
        assert list(again) == list(first)
        assert all(again[k].read_bytes() == first[k].read_bytes() for k in again), kind
    other = _files(fake.build("visa", tmp_path / "b", seed=1))
    first = _files(root / "visa")
    assert list(other) == list(first)
    assert other["split_csv/1cls.csv"].read_bytes() == first["split_csv/1cls.csv"].read_bytes()
    jpg = "candle/Data/Images/Normal/0000.JPG"
    assert other[jpg].read_bytes() != first[jpg].read_bytes()  # another seed: the same layout, other pictures


def test_other_arguments_rebuild_and_real_trees_are_never_touched(tmp_path):
    out = fake.build("covidx", tmp_path, seed=0)
    first = (out / "train.txt").read_text()
    assert fake.build("covidx", tmp_path, seed=1) == out
    assert json.loads((out / fake.MARKER).read_text())["seed"] == 1 and (out / "train.txt").read_text() != first
    assert not list(tmp_path.glob(".*.building"))
    real = tmp_path / "mvtec" / "bottle" / "train" / "good" / "000.png"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"a real image")
    with pytest.raises(FileExistsError, match="not a fake tree"):
        fake.build("mvtec", tmp_path)
    assert real.read_bytes() == b"a real image" and not list(tmp_path.glob(".*.building"))
    with pytest.raises(UnknownDataset, match="kinds"):
        fake.build("imagenet", tmp_path)
    with pytest.raises(TypeError):
        fake.build("cub200", tmp_path, no_such_option=1)
    assert not (tmp_path / "cub200").exists()


def test_options(tmp_path):
    out = fake.build("mvtec", tmp_path, categories=["grid"], size=32)
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["grid"]
    with Image.open(out / "grid" / "train" / "good" / "000.png") as im:
        assert im.size == (32, 32) and im.mode == "L"
    kv = fake.build("hyper-kvasir", tmp_path, n_normal=30)
    assert len(get_dataset("hyper-kvasir/all", "train", root=tmp_path, n_train=25)) == 25
    assert len(list(kv.rglob("cecum/*.jpg")) + list(kv.rglob("ileum/*.jpg")) + list(kv.rglob("bbps-2-3/*.jpg"))) == 30


def test_bmad_valid_split_and_unknown_sets(root):
    valid = get_dataset("bmad/brats2021", "valid", root=root, image_size=32)
    assert len(valid) == 4 and int(valid.labels.sum()) == 2  # the split get_dataset refused before
    with pytest.raises(UnknownDataset, match="brats2021"):
        get_dataset("bmad/brain", "test", root=root)
    with pytest.raises(ValueError, match="split must be one of"):
        get_dataset("mvtec/bottle", "valid", root=root)
