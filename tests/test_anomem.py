"""AnoMem: Hopfield retrieval (Eq. 1), memory bypass (Eq. 3), NT-Xent (Eq. 5), double hinge (Eq. 11),
the multi-scale loss (Eq. 7), both stages end to end, the k-means baseline and the CUB-200 loader."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import uadkit.models
from uadkit import metrics
from uadkit.data import DatasetUnavailable, UnknownDataset, get_dataset
from uadkit.models import anomem as A


def _tiny(**kw):
    base = dict(depth=18, width=4, image_size=16, memory_sizes=(8, 4), epochs=2, batch_size=64, lr=0.05,
                stage2_epochs=5, hidden=8, flip=False, blur=False)
    return A.AnoMemConfig(**{**base, **kw})


def test_hopfield_retrieves_a_stored_pattern_from_a_noisy_copy_at_high_beta():
    torch.manual_seed(0)
    hf = A.Hopfield(dim=32, patterns=10, beta=8.0)
    stored = hf.stored()  # 10×32 unit vectors
    noisy = stored + 0.3 * torch.randn(10, 32) / math.sqrt(32)
    out = hf(noisy)
    assert out.shape == (10, 32)
    assert torch.allclose(out, stored, atol=1e-3)  # each noisy copy retrieves its own pattern
    low = A.Hopfield(dim=32, patterns=10, beta=0.01)
    low.patterns.data = hf.patterns.data.clone()
    assert not torch.allclose(low(noisy), stored, atol=0.1)  # at low β: a blend of all patterns (≈ their mean)
    assert torch.allclose(low(noisy), stored.mean(0).expand(10, -1), atol=0.05)
    w = hf.attention(noisy)
    assert torch.allclose(w.sum(-1), torch.ones(10)) and torch.equal(w.argmax(-1), torch.arange(10))


def test_memory_is_bypassed_for_anomalous_samples():
    torch.manual_seed(0)
    hf = A.Hopfield(dim=8, patterns=5, beta=2.0)
    z = torch.randn(4, 8)
    normal = torch.tensor([1, 0, 1, 0])
    out = A.memorize(z, hf, normal)
    assert torch.allclose(out[1], F.normalize(z[1], dim=0)) and torch.allclose(out[3], F.normalize(z[3], dim=0))
    assert torch.allclose(out[[0, 2]], hf(z[[0, 2]]))
    # gradients reach the stored patterns only through the normal samples
    hf.patterns.grad = None
    A.memorize(z, hf, torch.tensor([0, 0, 0, 0])).sum().backward()
    assert hf.patterns.grad is None or torch.all(hf.patterns.grad == 0)
    A.memorize(z, hf, normal).sum().backward()
    assert hf.patterns.grad.abs().sum() > 0


def test_double_hinge_against_hand_values():
    d = torch.tensor([0.2, 1.5, 1.0, 3.0, -1.0])
    normal = torch.tensor([1, 1, 0, 0, 0])
    # M = 2: normal pulled below 1/M = 0.5, anomalies pushed above M = 2
    expected = torch.tensor([0.0, 1.0, 1.0, 0.0, 3.0])
    assert torch.allclose(A.double_hinge(d, normal, margin=2.0), expected)
    assert torch.allclose(A.double_hinge(torch.tensor([0.3]), torch.tensor([1]), margin=4.0), torch.tensor([0.05]))


def test_nt_xent_against_a_direct_computation_on_four_vectors():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5), torch.randn(2, 5)
    tau = 0.1
    views = [a[0], a[1], b[0], b[1]]  # the multi-view batch; positives: 0↔2, 1↔3
    pos = {0: 2, 1: 3, 2: 0, 3: 1}

    def sim(u, v):
        return float(torch.dot(u, v) / (u.norm() * v.norm()))

    direct = []
    for i in range(4):
        num = math.exp(sim(views[i], views[pos[i]]) / tau)
        den = sum(math.exp(sim(views[i], views[p]) / tau) for p in range(4) if p != i)
        direct.append(-math.log(num / den))
    got = A.nt_xent(a, b, tau=tau)
    assert got.shape == (4,)
    assert np.allclose(got.numpy(), direct, atol=1e-4)


def test_variance_loss_and_multiscale_loss_sampling():
    torch.manual_seed(0)
    same = torch.ones(6, 4)
    spread = torch.randn(6, 4)
    ones = torch.ones(6)
    assert A.variance_loss(spread, ones) < A.variance_loss(same, ones) <= 0  # collapse costs more
    net = A.AnoMemNet(config=_tiny())
    x = torch.rand(3, 3, 16, 16)
    z = net.features(x)
    assert [t.shape for t in z] == [(3, 16, 4, 4), (3, 32, 1, 1)]  # after stage 3; last stage pooled
    loss = A.multiscale_loss(z, net.features(x), net, torch.tensor([1, 1, 0]), generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    single = A.AnoMemNet(config=_tiny(multi_scale=False))
    assert [t.shape for t in single.features(x)] == [(3, 32, 1, 1)] and single.config.lambdas == (1.0,)
    assert _tiny().lambdas == (1.0, 2.0)  # λ(s) = 2^(s−1)


def test_deviation_maps_scores_and_fusion():
    hf = A.Hopfield(dim=4, patterns=3, beta=50.0)
    z = hf.stored()[0].reshape(1, 4, 1, 1).expand(2, 4, 2, 2).clone()
    z[1, :, 0, 0] = -z[1, :, 0, 0]  # one position far from every pattern
    delta = A.deviation_maps([z], [hf])
    assert delta[0].shape == (2, 4, 2, 2)
    s = A.one_class_scores(delta)
    assert s.shape == (2, 1) and s[0, 0] < 1e-3 < s[1, 0]
    assert torch.allclose(A.fuse(torch.tensor([[1.0, 4.0]]), (1.0, 2.0)), torch.tensor([3.0]))


def _digits(k=0, size=16):
    train = get_dataset(f"digits/{k}", "train", image_size=size)
    pool = torch.utils.data.ConcatDataset([get_dataset(f"digits/{j}", "train", image_size=size) for j in (1, 2, 3)])
    return train, pool, get_dataset(f"digits/{k}", "test", image_size=size)


def test_contaminate_adds_the_anomaly_ratio():
    train, pool, _ = _digits()
    mixed = A.contaminate(train, pool, 0.05, seed=0)
    n = len(train)
    assert len(mixed) == n + math.ceil(0.05 * n) and int(mixed.labels.sum()) == math.ceil(0.05 * n)
    assert len(A.contaminate(train, pool, 0.0)) == n


def test_detector_one_class_and_semi_supervised_end_to_end():
    train, pool, test = _digits()
    det = A.AnoMemDetector(_tiny(), progress=False)
    det.fit(train)
    assert det.detectors is None and len(det.history) == 2
    scores, maps = det.predict(test)
    assert scores.shape == (len(test),) and maps.shape == (len(test), 1, 16, 16) and torch.isfinite(scores).all()
    det.fit(A.contaminate(train, pool, 0.1))
    assert det.detectors is not None
    out = det.score_all(test)
    assert set(out) >= {"one-class", "semi-supervised", "semi-supervised scale 1"}
    assert torch.allclose(det.predict(test)[0], out["semi-supervised"], atol=1e-5)
    km = A.AnoMemDetector(_tiny(prototypes="kmeans", multi_scale=False), progress=False).fit(train)
    cents = km.net.memory(0).centroids
    assert torch.allclose(cents.norm(dim=1), torch.ones(len(cents)), atol=1e-4)
    scores = km.predict(test)[0]
    assert scores.shape == (len(test),) and torch.isfinite(scores).all() and scores.min() >= 0  # ‖z − centroid‖
    assert 0 <= metrics.image_auroc(scores, test.labels) <= 1


def test_stage1_is_repeatable_and_resumes(tmp_path):
    train, _, _ = _digits()
    a = A.AnoMemDetector(_tiny(), progress=False).fit(train)
    b = A.AnoMemDetector(_tiny(), progress=False).fit(train)
    assert a.history == b.history
    before = torch.get_num_threads()
    A.AnoMemDetector(_tiny(threads=1, epochs=1), progress=False).fit(train)
    assert torch.get_num_threads() == before  # the thread setting is restored
    ck = tmp_path / "anomem.pt"
    A.AnoMemDetector(_tiny(epochs=2), progress=False).fit(train, checkpoint=ck)
    state = torch.load(ck, weights_only=True)
    state["history"], state["epoch"] = [123.0], 1  # as if cut off after epoch 1; the sentinel shows a resume
    torch.save(state, ck)
    c = A.AnoMemDetector(_tiny(epochs=2), progress=False).fit(train, checkpoint=ck)
    assert len(c.history) == 2 and c.history[0] == 123.0 and c.history[1] != 123.0
    with pytest.raises(ValueError, match="other settings"):  # a checkpoint of other settings is refused
        A.AnoMemDetector(_tiny(epochs=3), progress=False).fit(train, checkpoint=ck)


def test_create_and_profiles():
    assert "anomem" in uadkit.models.available()
    det = uadkit.models.create("anomem", progress=False, epochs=3)
    assert det.config.epochs == 3 and det.config.depth == 18
    paper = A.AnoMemConfig.for_profile("paper")
    assert (paper.depth, paper.memory_sizes, paper.ratios, paper.beta, paper.lambda_v, paper.tau, paper.margin) == \
        (50, (512, 256), (0.3, 1.0), 2.0, 0.05, 0.1, 2.0)
    net = A.AnoMemNet(config=A.AnoMemConfig(depth=50, width=4, memory_sizes=(8, 4)))
    z = net.features(torch.rand(2, 3, 32, 32))
    assert [t.shape for t in z] == [(2, 64, 8, 8), (2, 128, 1, 1)]  # Bottleneck ×4 channels
    with pytest.raises(ValueError, match="prototypes"):
        A.AnoMemNet(config=_tiny(prototypes="nope"))


def _fake_cub(root, per_class=4, classes=3):
    base = root / "cub200" / "CUB_200_2011"
    lines, labels, split = [], [], []
    i = 1
    for c in range(1, classes + 1):
        folder = base / "images" / f"{c:03d}.Bird_{c}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(np.full((20, 24, 3), 40 * c, np.uint8)).save(folder / f"b{j}.jpg")
            lines.append(f"{i} {folder.name}/b{j}.jpg")
            labels.append(f"{i} {c}")
            split.append(f"{i} {int(j % 2 == 0)}")
            i += 1
    for name, rows in (("images.txt", lines), ("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        (base / name).write_text("\n".join(rows) + "\n")
    return root


def test_cub_loader_on_a_fake_tree(tmp_path):
    root = _fake_cub(tmp_path)
    train = get_dataset("cub200/1", "train", root=root, image_size=16)
    test = get_dataset("cub200/1", "test", root=root, image_size=16)
    assert len(train) == 2 and all(train[i]["label"] == 0 for i in range(2))
    assert train[0]["image"].shape == (3, 16, 16)
    assert len(test) == 4 and sorted(test[i]["label"] for i in range(4)) == [0, 0, 1, 1]
    assert abs(float(train[0]["image"].mean()) - 80 / 255) < 0.05  # class 1 = folder 002 (the files count from 1)
    with pytest.raises(UnknownDataset):
        get_dataset("cub200/200", "train", root=root)


def test_cub_loader_fails_fast_naming_the_script(tmp_path):
    with pytest.raises(DatasetUnavailable, match="data_scripts/cub.py"):
        get_dataset("cub200/0", "train", root=tmp_path)
