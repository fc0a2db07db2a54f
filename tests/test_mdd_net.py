"""MDD-Net: the two paths share the teacher not the decoders, L_dist reads the synthetic mask,
item entropies at their bounds, maps at input resolution, losses by hand, a short multi-class fit,
training read batch by batch (memory that does not grow with the data), every tensor on the model's device."""
import math

import pytest
import torch

import uadkit.models
from uadkit.data import ArrayDataset, get_dataset, multiclass
from uadkit.models import mdd_net as M


class TinyTeacher(torch.nn.Module):
    """A stand-in frozen teacher: four stages of strides 2, 4, 8, 16 (channels 3, 4, 6, 8)."""

    channels, strides = [3, 4, 6, 8], [2, 4, 8, 16]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, stride=2, padding=1)
                                         for a, b in zip([3, 3, 4, 6], self.channels))
        self.requires_grad_(False)

    def forward(self, x):
        outs = []
        for conv in self.convs:
            x = conv(x)
            outs.append(x)
        return outs


def _model(**kw):
    cfg = M.MDDConfig(layers=(1, 2, 3), dim=8, memory_items=5, neck_stride=1, **kw)
    return M.MDDNet(teacher=TinyTeacher(), config=cfg, classes=3)


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_paths_share_the_teacher_but_not_the_decoder_weights():
    model = _model()
    assert model.restoration is not model.identity
    r_ids = {id(p) for p in model.restoration.parameters()}
    assert r_ids.isdisjoint(id(p) for p in model.identity.parameters())
    seen = []
    model.teacher.register_forward_hook(lambda mod, a, out: seen.append(out))
    out = model(torch.rand(2, 3, 32, 32))
    assert len(seen) == 1  # one teacher pass feeds both paths
    assert [f.shape for f in out["restoration"]] == [f.shape for f in out["identity"]] == [f.shape for f in out["teacher"]]
    # L_identity trains the identity decoder (and the shared neck), never the restoration decoder or the memory
    M.cosine_loss(out["teacher"], model.reproduce(out["teacher"])).backward()
    assert all(g is None for g in _grads(model.restoration)) and all(g is None for g in _grads(model.memory))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(model.identity))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(model.neck))
    model.zero_grad(set_to_none=True)
    rec, _ = model.restore(out["teacher"])
    M.cosine_loss(out["teacher"], rec).backward()  # and the restoration loss the other way round
    assert all(g is None for g in _grads(model.identity))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(model.memory))


def test_dist_loss_uses_the_synthetic_mask():
    r = [torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]]).reshape(1, 2, 1, 2)]  # 2 channels, 1×2 grid
    i = [torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]]).reshape(1, 2, 1, 2)]
    # location 0: r = (1, 0), i = (1, 0) → d = 0; location 1: r = (0, 1), i = (1, 0) → d = 1
    mask_at_1 = torch.tensor([[[[0.0, 1.0]]]])
    mask_at_0 = torch.tensor([[[[1.0, 0.0]]]])
    # mask on the disagreeing location: normal part d = 0, anomalous part max(0, 0.5 − 1) = 0
    assert M.discrepancy_loss(r, i, mask_at_1, margin=0.5).item() == pytest.approx(0.0, abs=1e-6)
    # mask on the agreeing location: normal part 1, anomalous part max(0, 0.5 − 0) = 0.5
    assert M.discrepancy_loss(r, i, mask_at_0, margin=0.5).item() == pytest.approx(1.5, abs=1e-6)
    # no anomaly: only the normal part, the mean distance
    assert M.discrepancy_loss(r, i, torch.zeros(1, 1, 1, 2), margin=0.5).item() == pytest.approx(0.5, abs=1e-6)
    # and through mdd_losses: changing only the mask changes the total
    model = _model()
    t = model.encode(torch.rand(2, 3, 32, 32))
    a = model.encode(torch.rand(2, 3, 32, 32))
    labels = torch.tensor([0, 2])
    torch.manual_seed(0)
    one = M.mdd_losses(model, t, labels, a, torch.zeros(2, 1, 32, 32))
    torch.manual_seed(0)
    other = M.mdd_losses(model, t, labels, a, torch.ones(2, 1, 32, 32))
    assert one["rec"] == other["rec"] and one["identity"] == other["identity"]
    assert one["dist"] != other["dist"] and one["total"] != other["total"]


def test_entropy_of_one_hot_and_uniform_items():
    c = 7
    assert M.entropy(torch.eye(c)).abs().max().item() == 0.0
    assert M.entropy(torch.full((3, c), 1 / c)).allclose(torch.full((3,), math.log(c)))
    # the class distribution of items from address weights, by hand: 2 classes, 3 items, 1×1 grid
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]).view(3, 1, 1, 3)
    p = M.item_class_distribution(w, torch.tensor([0, 1, 1]), 2)
    assert p.shape == (3, 2)
    assert p[0].tolist() == [1.0, 0.0] and p[1].tolist() == [0.0, 1.0]  # item 0 only class 0, item 1 only class 1
    w[0, 0, 0] = torch.tensor([0.0, 0.5, 0.5])  # now both classes use items 1, 2 equally
    p = M.item_class_distribution(w, torch.tensor([0, 1, 1]), 2)
    assert p[1].tolist() == [0.5, 0.5] and M.entropy(p[1]).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("signal", ["fused", "restoration", "discrepancy"])
def test_fused_map_has_input_resolution(signal):
    model = _model()
    out = model(torch.rand(2, 3, 48, 32))
    s = M.fused_map(out, (48, 32), signal=signal)
    assert s.shape == (2, 1, 48, 32) and (s >= 0).all()
    assert M.gaussian_blur(s, 1.5).shape == s.shape and M.image_score(s).shape == (2,)


def test_fusion_is_the_sum_of_the_two_signals():
    model = _model()
    out = model(torch.rand(2, 3, 32, 32))
    both = M.fused_map(out, (32, 32), signal="fused", weight=0.5)
    parts = M.fused_map(out, (32, 32), signal="restoration") + 0.5 * M.fused_map(out, (32, 32), signal="discrepancy")
    assert torch.allclose(both, parts, atol=1e-6)


def test_memory_items_learn_in_feature_rms_units_and_read_back_at_feature_scale():
    mem = M.ClassAwareMemory(channels=4, items=3, classes=2, temperature=0.01)
    feats = torch.randn(2, 4, 3, 3) * 10  # large teacher features
    mem.init_from(feats, torch.Generator().manual_seed(0))
    assert mem.scale.item() == pytest.approx(feats.pow(2).mean().sqrt().item(), rel=1e-5)
    assert mem.items.pow(2).mean().sqrt().item() < 3  # stored in RMS units, not at the features' size
    stored = mem.items.detach() * mem.scale  # an item, read back, is the feature vector it was drawn from
    vectors = feats.permute(0, 2, 3, 1).reshape(-1, 4)
    assert all((vectors - v).abs().max(dim=1).values.min() < 1e-4 for v in stored)
    read, w, logp = mem(stored.T.reshape(1, 4, 1, 3))  # each location equals one item: it reads (nearly) itself
    assert torch.allclose(read[0, :, 0].T, stored, atol=1e-3)
    assert torch.allclose(logp.exp().sum(1), torch.ones(1)) and logp.shape == (1, 2)


def test_class_posterior_mixes_the_items_class_distributions():
    mem = M.ClassAwareMemory(channels=2, items=2, classes=2, temperature=1.0)
    with torch.no_grad():
        # item 0 belongs to class 0, item 1 to class 1
        mem.item_class_logits.copy_(torch.tensor([[20.0, -20.0], [-20.0, 20.0]]))
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).view(2, 1, 1, 2)
    p = mem.class_logits(w).exp()
    assert torch.allclose(p, torch.tensor([[1.0, 0.0], [0.5, 0.5]]), atol=1e-6)
    # reading only class-0 items costs nothing for a class-0 image, everything for a class-1 image
    assert M.class_loss([mem.class_logits(w[:1])], torch.tensor([0])).item() < 1e-6
    assert M.class_loss([mem.class_logits(w[:1])], torch.tensor([1])).item() > 10


def test_fusion_weight_is_chosen_on_validation_masks():
    torch.manual_seed(0)
    masks = torch.zeros(4, 1, 16, 16)
    masks[:, :, 4:8, 4:8] = 1
    noise = torch.rand(4, 1, 16, 16)
    # s_res weakly informative, s_dis strongly: a positive λ wins
    lam, curve = M.select_fusion_weight(noise + 0.2 * masks, masks * 1.0, masks, (0.0, 0.5, 2.0))
    assert set(curve) == {0.0, 0.5, 2.0} and lam > 0 and curve[lam] > curve[0.0]
    # s_dis anti-informative (high outside the defect): λ = 0, fusion switched off
    lam, curve = M.select_fusion_weight(noise + masks, 1 - masks, masks, (0.0, 0.5, 2.0))
    assert lam == 0.0 and curve[0.0] > curve[2.0]
    # an uninformative constant s_dis ties every λ: the smallest wins
    assert M.select_fusion_weight(noise + masks, torch.zeros_like(masks), masks, (1.0, 0.0, 2.0))[0] == 0.0


def _black_and_white(n=4, size=32):
    """Class "a" all black, class "b" all white: a fill from the other class shows inside the mask."""
    return torch.utils.data.ConcatDataset([
        ArrayDataset(torch.full((n, 3, size, size), float(v)), torch.zeros(n), None, category=cat, name=cat)
        for v, cat in ((0, "a"), (1, "b"))])


def test_synthesis_fills_with_another_class_read_from_the_dataset():
    data = _black_and_white()
    assert M.item_categories(data) == ["a"] * 4 + ["b"] * 4
    pairs = M.TrainingPairs(data, ["a", "b"], source="other_class")
    items = [pairs[(i, 100 + i)] for i in range(8)]
    bad, masks = torch.stack([it["anomalous"] for it in items]), torch.stack([it["mask"] for it in items])
    assert bad.shape == (8, 3, 32, 32) and masks.shape == (8, 1, 32, 32) and (masks.flatten(1).sum(1) > 0).all()
    assert [it["class"] for it in items] == [0] * 4 + [1] * 4
    inside, outside = masks[:4].bool().expand(-1, 3, -1, -1), ~masks[:4].bool().expand(-1, 3, -1, -1)
    assert bad[:4][outside].max() == 0 and bad[:4][inside].mean() > 0.05  # white from class b inside the mask only
    assert torch.equal(pairs[(0, 100)]["anomalous"], items[0]["anomalous"])  # a seed gives one anomaly
    assert not torch.equal(pairs[(0, 101)]["mask"], items[0]["mask"])  # another seed (epoch), another anomaly
    selfish = M.TrainingPairs(data, ["a", "b"], source="self")
    assert selfish[(0, 100)]["anomalous"].max() == 0  # a black image's own tiles are black
    assert set(M.TrainingPairs(data, ["a", "b"], dual=False)[(0, 1)]) == {"image", "class"}
    with pytest.raises(ValueError, match="synth_source"):
        M.TrainingPairs(data, ["a", "b"], source="dtd")


def test_fresh_draws_are_a_permutation_with_new_seeds_and_repeat_from_the_generator_state():
    g = torch.Generator().manual_seed(0)
    sampler = M.FreshDraws(10, g)
    state = g.get_state()
    first, second = list(sampler), list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and len(sampler) == 10
    assert {s for _, s in first}.isdisjoint(s for _, s in second)  # every epoch new anomalies
    g.set_state(state)  # what train.fit restores when it resumes
    assert list(sampler) == first


def test_training_batches_do_not_depend_on_the_number_of_loader_workers():
    data = _black_and_white(n=6, size=16)
    det = uadkit.models.create("mdd_net", progress=False, pretrained=False, batch_size=4, dim=8, memory_items=4)
    det.classes = ["a", "b"]
    batches = {}
    for workers in (0, 2):
        det.num_workers = workers
        batches[workers] = [b for _, b in zip(range(2), det.training_data(data))]
    assert len(batches[0]) == 2 and batches[0][0]["anomalous"].shape == (4, 3, 16, 16)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches[0], batches[2]) for k in a)


def test_reservoir_draws_uniformly_from_a_stream_and_keeps_k_vectors():
    feats = [torch.arange(b * 2 * 3 * 3, dtype=torch.float32).view(b, 2, 3, 3) + 100 * k
             for k, b in enumerate((1, 3, 2))]
    every = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, 2) for f in feats])  # 54 vectors
    counts = torch.zeros(len(every))
    for seed in range(300):
        sample = M.VectorSample(5, torch.Generator().manual_seed(seed))
        for f in feats:
            sample.add(f)
        assert sample.vectors.shape == (5, 2) and len(sample.keys) == 5
        hit = (sample.vectors[:, None] == every[None]).all(-1)  # 5×54: each kept vector is one of the stream
        assert (hit.sum(1) == 1).all() and hit.any(0).sum() == 5  # and no vector twice
        counts += hit.any(0)
    assert sample.rms == pytest.approx(every.pow(2).mean().sqrt().item(), rel=1e-6)
    # every vector is kept with probability 5/54, whichever batch it came in (±5 sigma over 300 draws)
    p = 5 / 54
    assert (counts / 300 - p).abs().max() < 5 * math.sqrt(p * (1 - p) / 300)


def test_cosine_map_by_hand():
    a = [torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone()]
    b = [a[0].clone()]
    b[0][0, :, 1, 1] = torch.tensor([0.0, 1.0])  # orthogonal at one cell → distance 1
    s = M.cosine_map(a, b, (2, 2))
    assert s[0, 0, 1, 1].item() == pytest.approx(1.0) and s.sum().item() == pytest.approx(1.0)
    assert M.cosine_loss(a, b).item() == pytest.approx(0.25)


def test_ablation_switches():
    plain = _model(dual=False, memory=False)
    assert plain.identity is None and plain.memory is None
    out = plain(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="identity decoder"):
        M.fused_map(out, (32, 32), signal="discrepancy")
    losses = M.mdd_losses(plain, out["teacher"], torch.tensor([0]), None, None)
    assert set(losses) == {"rec", "cls", "total"} and losses["cls"].item() == 0
    mem = _model(cls_weight=0.0)
    out = mem(torch.rand(2, 3, 32, 32))
    assert len(out["logits"]) == 3 and out["logits"][0].shape == (2, 3)
    losses = M.mdd_losses(mem, out["teacher"], torch.tensor([0, 1]), out["teacher"], torch.zeros(2, 1, 32, 32))
    assert losses["total"].item() == pytest.approx(
        (losses["rec"] + losses["restoration"] + losses["identity"] + losses["dist"]).item(), rel=1e-5)


def test_short_multiclass_fit_lowers_the_loss_and_resumes(tmp_path):
    names = ["mini/brick", "mini/grass"]
    small = dict(n_train=16, n_test=2, n_anomalous=2, image_size=32)  # one cached build per category
    train = multiclass(names, "train", **small)
    kw = dict(progress=False, epochs=4, batch_size=8, memory_items=8, dim=16)
    det = uadkit.models.create("mdd_net", **kw)
    teacher = {k: v.clone() for k, v in det.teacher.state_dict().items()}
    det.fit(train, checkpoint=tmp_path / "mdd.pt")
    assert all(torch.equal(v, teacher[k]) for k, v in det.teacher.state_dict().items())  # the teacher stays frozen
    assert det.classes == names and det.history[-1] < det.history[0]
    assert set(det.fusion_curve) == set(det.config.fusion_grid) and det.fusion_weight in det.config.fusion_grid
    first = {k: v.clone() for k, v in det.model.state_dict().items()}
    again = uadkit.models.create("mdd_net", **kw).fit(train, checkpoint=tmp_path / "mdd.pt")
    assert all(torch.equal(v, first[k]) for k, v in again.model.state_dict().items())
    assert again.teacher is det.teacher  # one frozen teacher for every detector of the process
    state = uadkit.train.load_checkpoint(tmp_path / "mdd.pt")
    assert state["model"] and not any("teacher" in k for k in state["model"])  # shared, so not checkpointed
    state["history"][0] = 123.0  # a sentinel: a finished checkpoint is loaded, not retrained
    uadkit.train.save_checkpoint(tmp_path / "mdd.pt", **state)
    assert uadkit.models.create("mdd_net", **kw).fit(train, checkpoint=tmp_path / "mdd.pt").history[0] == 123.0
    scores, maps = det.predict(get_dataset("mini/brick", "test", **small))
    assert scores.shape == (4,) and maps.shape == (4, 1, 32, 32)


def test_teacher_features_stop_after_the_last_stage_read():
    from uadkit import backbones

    teacher = backbones.shared("efficientnet_lite0")  # a timm network: feature_info names its stages' modules
    x = torch.rand(2, 3, 64, 64)
    names = teacher.model.feature_info.module_name()
    modules = dict(teacher.model.named_modules())
    calls = []
    probe = modules[names[4]].register_forward_hook(lambda *a: calls.append(1))  # the stride-32 stage
    try:
        with torch.no_grad():
            full = teacher(x)
            assert len(calls) == 1
            feats = M.teacher_features(teacher, x, (1, 2, 3))
    finally:
        probe.remove()
    assert len(calls) == 1  # the stage after layer 3 was not run again
    assert all(torch.equal(full[i], f) for i, f in zip((1, 2, 3), feats))
    assert not any(m._forward_hooks for m in teacher.modules())  # no hook left on the shared network
    tiny = TinyTeacher()  # no feature_info: the whole forward
    assert [f.shape for f in M.teacher_features(tiny, x, (1, 3))] == [(2, 4, 16, 16), (2, 8, 4, 4)]


def test_paper_profile_settings():
    cfg = M.MDDConfig.for_profile("paper")
    assert cfg.backbone == "wide_resnet50_2" and cfg.layers == (1, 2, 3) and cfg.neck_stride == 2
    smoke = M.MDDConfig.for_profile("smoke")
    assert smoke.backbone == "efficientnet_lite0"
    # the smoke settings the chapter's reimplementation notes state (the paper profile's are untouched)
    assert (smoke.dim, smoke.epochs, smoke.batch_size, smoke.memory_items) == (32, 8, 16, 48)
    assert (cfg.dim, cfg.epochs, cfg.batch_size, cfg.memory_items, cfg.lr) == (256, 200, 16, 200, 5e-3)
    # the paper profile builds WRN50 at random weights on a 64-px image (no download needed)
    det = uadkit.models.create("mdd_net", profile="paper", device="cpu", pretrained=False, dim=16,
                               memory_items=4, progress=False)
    model = M.MDDNet(teacher=det.teacher, config=det.config, classes=2)
    out = model(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in out["teacher"]] == [256, 512, 1024]
    assert M.fused_map(out, (64, 64)).shape == (1, 1, 64, 64)


def test_paper_code_path_on_fake_mvtec_and_uni_medical_trees(tmp_path):
    """The chapter's paper profile: WRN50 teacher (random weights here), one model for several folder trees."""
    from test_data_folders import make_mvtec_tree
    from test_qfae import make_bmad_tree

    make_mvtec_tree(tmp_path)
    make_bmad_tree(tmp_path, "Brain")
    names = ["mvtec/bottle", "bmad/brats2021"]
    train = multiclass(names, "train", root=tmp_path, image_size=64)
    det = uadkit.models.create("mdd_net", profile="paper", device="cpu", pretrained=False, dim=16, memory_items=4,
                               epochs=1, batch_size=4, progress=False)
    det.fit(train)
    assert det.classes == sorted(names) and det.fusion_weight in det.config.fusion_grid
    assert det.config.backbone == "wide_resnet50_2" and det.config.init_images == det.config.fusion_images == 256
    for name in names:
        result = det.evaluate(get_dataset(name, "test", root=tmp_path, image_size=64))
        assert set(result) == {"image AUROC", "pixel AUROC", "AUPRO"}


@pytest.mark.parametrize("variant", [{}, dict(memory=False), dict(dual=False, memory=False)],
                         ids=["mdd_net", "drd_net", "rd4ad"])
def test_a_training_step_and_a_prediction_stay_on_the_meta_device(variant):
    """The paper's model (WRN50, width 256, 200 items) and its inputs on "meta": any tensor the method
    builds on the CPU instead of on its input's device would raise when mixed with them."""
    det = uadkit.models.create("mdd_net", profile="paper", device="meta", pretrained=False, progress=False, **variant)
    det.classes = ["a", "b"]
    det.model = M.MDDNet(teacher=det.teacher, config=det.config, classes=2).to("meta")
    assert all(p.device.type == "meta" for p in det.teacher.parameters())
    ones = lambda *shape: torch.ones(*shape, device="meta")  # noqa: E731
    batch = {"image": ones(2, 3, 256, 256), "class": torch.zeros(2, dtype=torch.long, device="meta"),
             "anomalous": ones(2, 3, 256, 256), "mask": ones(2, 1, 256, 256)}
    losses = M.training_loss(det.model, batch)
    losses["total"].backward()
    assert losses["total"].device.type == "meta" and ("dist" in losses) == det.config.dual
    assert all(p.grad is not None for p in det.model.restoration.parameters())
    scores, maps = det._predict_batch(ones(2, 3, 256, 256))
    assert scores.shape == (2,) and maps.shape == (2, 1, 256, 256) and maps.device.type == "meta"


@pytest.mark.paper_memory
def test_fit_memory_does_not_grow_with_the_training_set(tmp_path):
    """Peak memory of a paper-profile fit (WRN50 at random weights, 256 px, the dry run's two optimiser steps,
    batch 8 so that both fits take two) on 16 and on 128 training images. The bounded samples (memory init,
    λ_f validation) are capped at 8 images, so what is left is what a fit keeps per training image: nothing.
    Margin 120 MB, twice the spread between repeated runs of one fit (±60 MB); images and teacher features
    kept in memory cost about 30 MB per image at 256 px (image, two anomalies, their WRN50 layer1-3
    features), over 3 GB more on 128 images."""
    from memory import fit_peaks_mb

    kw = dict(batch_size=8, init_images=8, fusion_images=8)
    small, large = fit_peaks_mb("mdd_net", (16, 128), tmp_path, **kw)
    assert large - small < 120, f"peak memory {small:.0f} MB on 16 images, {large:.0f} MB on 128"
