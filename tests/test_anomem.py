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
    from uadkit import train as T

    ck = tmp_path / "anomem.pt"
    A.AnoMemDetector(_tiny(epochs=2), progress=False).fit(train, checkpoint=ck)
    state = T.load_checkpoint(ck)
    state["epoch"], state["history"] = 1, [123.0]  # as if cut off after epoch 1; a sentinel only a resumed run keeps
    T.save_checkpoint(ck, **state)
    c = A.AnoMemDetector(_tiny(epochs=2), progress=False).fit(train, checkpoint=ck)
    assert len(c.history) == 2 and c.history[0] == 123.0 and c.history[1] != 123.0
    with pytest.raises(ValueError, match="other settings"):  # a checkpoint of another config is not resumed
        A.AnoMemDetector(_tiny(epochs=3), progress=False).fit(train, checkpoint=ck)


def test_create_and_profiles():
    assert "anomem" in uadkit.models.available()
    det = uadkit.models.create("anomem", progress=False, epochs=3)
    assert det.config.epochs == 3 and det.config.depth == 10 and det.config.memory_init == "data"
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
    with pytest.raises(DatasetUnavailable, match="python -m uadkit.fetch cub --root"):
        get_dataset("cub200/0", "train", root=tmp_path)


# --------------------------------------------------------------------------- paper-scale memory and devices

class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (in elements) any operator produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_nt_xent_in_row_blocks_equals_the_whole_matrix():
    torch.manual_seed(0)
    a, b = torch.randn(37, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True)
    whole = A.nt_xent(a, b, tau=0.1)
    ga, gb = torch.autograd.grad(whole.sum(), (a, b))
    for budget in (74 * 5, 74 * 13, 1):  # blocks of 5 and 13 rows (the last one shorter), and of 1 row
        blocks = A.nt_xent(a, b, tau=0.1, max_elements=budget)
        assert blocks.shape == (74,) and torch.allclose(blocks, whole, atol=1e-5)
        ba, bb = torch.autograd.grad(blocks.sum(), (a, b))
        assert torch.allclose(ba, ga, atol=1e-5) and torch.allclose(bb, gb, atol=1e-5)
    assert torch.equal(A.nt_xent(a, b, tau=0.1, max_elements=74 * 74), whole)  # fits: one block, the same numbers


def test_nt_xent_memory_is_bounded_at_figure_4s_r_1():
    # r(1) = 1 at B = 1024 and 8×8 positions: 2·1024·64 = 131,072 anchors, a 131,072² logit matrix (69 GB) if whole
    n = 1024 * 64
    a = torch.randn(n, 16, device="meta", requires_grad=True)
    b = torch.randn(n, 16, device="meta", requires_grad=True)
    with _LargestTensor() as seen:
        A.nt_xent(a, b, tau=0.1).mean().backward()
    assert seen.largest <= A.NT_XENT_MAX_ELEMENTS < (2 * n) ** 2 // 100
    assert a.grad.shape == a.shape


def _strict_generators(monkeypatch):
    """torch.multinomial / torch.randint that refuse a generator on another device than their tensors,
    as CUDA's kernels do (the meta device does not check)."""
    real_multinomial, real_randint = torch.multinomial, torch.randint

    def multinomial(input, num_samples, *args, generator=None, **kw):
        if generator is not None and generator.device.type != input.device.type:
            raise RuntimeError(f"generator on {generator.device}, weights on {input.device}")
        return real_multinomial(input, num_samples, *args, generator=generator, **kw)

    def randint(*args, generator=None, device=None, **kw):
        if generator is not None and generator.device.type != torch.device(device or "cpu").type:
            raise RuntimeError(f"generator on {generator.device}, output on {device or 'cpu'}")
        return real_randint(*args, generator=generator, device=device, **kw)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    monkeypatch.setattr(torch, "randint", randint)


def test_kmeans_seeding_draws_with_a_generator_on_the_vectors_device(monkeypatch):
    _strict_generators(monkeypatch)
    x = F.normalize(torch.randn(50, 4), dim=-1)
    c = A.kmeans_pp(x, 5, seed=0)
    assert c.shape == (5, 4) and torch.equal(c, A.kmeans_pp(x, 5, seed=0))  # CPU: seeded, repeatable
    meta = A.kmeans_pp(x.to("meta"), 5, seed=0)  # not the CPU generator for another device's tensors
    assert meta.shape == (5, 4) and meta.device.type == "meta"


def test_kmeans_streamed_in_batches_matches_kmeans_in_memory():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 6), dim=-1)
    x = (centres.repeat_interleave(30, 0) + 0.05 * torch.randn(120, 6))[torch.randperm(120)]
    whole = A.KMeansPrototypes(dim=6, patterns=4).fit(x, seed=0).centroids
    one = A.KMeansPrototypes(dim=6, patterns=4).fit_stream(lambda: iter([x]), seed=0).centroids
    assert torch.equal(one, whole)  # one batch: the in-memory algorithm, number for number
    parts = A.KMeansPrototypes(dim=6, patterns=4).fit_stream(lambda: iter(x.split(7)), seed=0, sample=1000)
    assert torch.allclose(parts.centroids, whole, atol=1e-5)  # batches change only the order of the sums
    small = A.KMeansPrototypes(dim=6, patterns=4).fit_stream(lambda: iter(x.split(7)), seed=0, sample=20)
    found = small.centroids @ centres.T  # seeded from a sample of 20 vectors: still finds the 4 clusters
    assert sorted(found.argmax(1).tolist()) == [0, 1, 2, 3] and found.max(1).values.min() > 0.95


def test_contaminated_training_set_reads_items_and_copies_no_image():
    train, pool, _ = _digits()
    mixed = A.contaminate(train, pool, 0.05, seed=0)
    assert not any(isinstance(v, torch.Tensor) and v.ndim == 4 for v in vars(mixed).values())  # no N×3×H×W copy
    n = len(train)
    assert torch.equal(mixed[0]["image"], train[0]["image"]) and mixed[0]["label"] == 0
    assert mixed[n]["label"] == 1 and mixed[len(mixed) - 1]["label"] == 1 == int(mixed.labels[-1])
    assert mixed[n]["mask"].shape == (1, 16, 16) and mixed[-1]["label"] == 1
    assert torch.equal(mixed[n]["image"], pool[int(mixed.pick[0])]["image"])


def test_contaminated_items_are_cached_up_to_a_budget(monkeypatch):
    train, pool, _ = _digits()
    reads = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            reads.append(i)
            return train[i]

    monkeypatch.setattr(A, "ITEM_CACHE_BYTES", 10 * 3 * 16 * 16 * 4 + 10 * 16 * 16 * 4)  # 10 items' image + mask
    mixed = A.contaminate(Counting(), pool, 0.0)
    for _ in range(3):  # three epochs
        for i in range(len(mixed)):
            mixed[i]
    assert reads.count(0) == 1 and reads.count(len(train) - 1) == 3  # the first 10 read once, the rest each epoch
    assert sum(reads.count(i) == 1 for i in range(len(train))) == 10


def test_stage2_and_scoring_see_one_batch_at_a_time(monkeypatch):
    train, pool, test = _digits()
    mixed = A.contaminate(train, pool, 0.1)
    det = A.AnoMemDetector(_tiny(batch_size=16), progress=False)
    sizes = []
    real = A.AnoMemDetector.deltas
    monkeypatch.setattr(A.AnoMemDetector, "deltas", lambda self, images: sizes.append(len(images)) or real(self, images))
    det.fit(mixed)
    assert det.detectors is not None and len(mixed) > 16 and max(sizes) <= 16
    sizes.clear()
    big = torch.utils.data.ConcatDataset([test] * 5)  # 5 × the test set: more than one scoring batch
    out = det.score_all(big)
    assert len(out["semi-supervised"]) == len(big) and max(sizes) <= 16 < len(big)
    assert torch.isfinite(out["semi-supervised"]).all()


@pytest.mark.paper_memory
def test_fit_memory_does_not_grow_with_the_training_set(tmp_path):
    """Peak memory of a paper-profile fit (ResNet-50 at 32 px, dry-run caps, stage-1 batch 8) with the
    k-means baseline on both scales (one Lloyd iteration), whose seeding sample is capped at 1,024 vectors
    (16 images' first scale): from 16 to 128 training images it grows by less than 60 MB (measured: about
    20 MB). The code that held every image's 8×8×1024 first-scale features (256 KB each, and copies) grew
    by about 400 MB."""
    from memory import fit_peaks_mb

    kw = dict(image_size=32, batch_size=8, prototypes="kmeans", kmeans_sample=1024, kmeans_iters=1)
    small, large = fit_peaks_mb("anomem", (16, 128), tmp_path, **kw)
    assert large - small < 60, f"peak memory grew by {large - small:.0f} MB (16: {small:.0f} MB, 128: {large:.0f} MB)"


def test_one_training_step_and_prediction_on_the_meta_device():
    """Every tensor the method builds follows its inputs' device: on "meta", one built on the CPU fails."""
    import torch.fx.experimental._config as fx_config

    config = A.AnoMemConfig.for_profile("paper")
    with torch.device("meta"):
        net = A.AnoMemNet(config=config)
    det = A.AnoMemDetector(config, device="meta", progress=False)
    det.net, det._gen = net, torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, device="meta")
    normal = torch.ones(4, dtype=torch.int64, device="meta")
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):  # the variance loss keeps the normal rows: all
        loss = det._stage1_loss(net, (x, normal))
    loss.backward()
    assert loss.device.type == "meta" and net.memories[0].patterns.grad.device.type == "meta"
    scores, maps = det._predict_batch(x)  # one-class
    assert scores.shape == (4,) and maps.shape == (4, 1, 32, 32) and maps.device.type == "meta"
    delta = det.deltas(x)
    det.detectors = torch.nn.ModuleList([A.ScaleDetector(channels=d.shape[1], pool=min(2, d.shape[-1]), hidden=8)
                                         for d in delta]).to("meta")
    stage2 = torch.stack([A.double_hinge(g(d), normal, margin=2.0) for g, d in zip(det.detectors, delta)]).mean()
    stage2.backward()
    scores, maps = det._predict_batch(x)  # semi-supervised
    assert scores.shape == (4,) and scores.device.type == "meta" and maps.shape == (4, 1, 32, 32)


def test_stage1_step_cost_counts_the_papers_step_on_meta():
    paper = A.AnoMemConfig.for_profile("paper")
    small = A.stage1_step_cost(paper, 8)
    large = A.stage1_step_cost(paper, 16)
    assert 2 * small.flops * 0.9 < large.flops < 2 * small.flops * 1.2  # mostly the encoder: linear in B
    assert small.param_bytes > 90e6 and small.activation_bytes > 0  # ResNet-50 + memories, float32


def test_memory_starts_from_training_features_with_data_init():
    """memory_init="data": each stored pattern starts as the unit feature of a training position; "random"
    (the paper's, and the default) keeps N(0, 1) patterns. A ResNet-10 has the same maps as a ResNet-18."""
    train, _, _ = _digits()
    cfg = _tiny(depth=10, memory_init="data")
    det = A.AnoMemDetector(cfg, progress=False)
    det.net, det._gen = A.AnoMemNet(config=cfg), torch.Generator().manual_seed(0)
    images = torch.stack([train[i]["image"] for i in range(20)])
    det.net.eval()
    with torch.no_grad():
        z = det.net.features(images)
        det._init_memory(images)
    assert [t.shape[1:] for t in z] == [(16, 4, 4), (32, 1, 1)]
    for s, zs in enumerate(z):
        v = F.normalize(zs.permute(0, 2, 3, 1).reshape(-1, zs.shape[1]), dim=-1)
        p = det.net.memory(s).patterns.detach()
        assert torch.allclose(p.norm(dim=1), torch.ones(len(p)), atol=1e-5)
        assert ((p @ v.T).max(1).values > 1 - 1e-4).all()  # every pattern is one of the feature vectors
    a = A.AnoMemDetector(_tiny(memory_init="data"), progress=False).fit(train)
    b = A.AnoMemDetector(_tiny(memory_init="data"), progress=False).fit(train)
    assert a.history == b.history and np.isfinite(a.history).all()
    assert A.AnoMemConfig.for_profile("paper").memory_init == "random"
    with pytest.raises(ValueError, match="memory_init"):
        A.AnoMemDetector(_tiny(memory_init="nope", epochs=1), progress=False).fit(train)
