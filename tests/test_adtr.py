"""ADTR: shapes, the auxiliary query cutting the decoder off its input, losses by hand, training that learns."""
import math

import pytest
import torch

import uadkit.models
from uadkit.data import get_dataset
from uadkit.models import adtr as A


class Identity(torch.nn.Module):
    """A stand-in embedding: the 'features' are the input itself (C = 3)."""

    channels = 3

    def forward(self, x):
        return x


def _model(**kw):
    cfg = A.ADTRConfig(dim=16, heads=2, ffn=32, encoder_layers=1, decoder_layers=1, **kw)
    return A.ADTRModel(embed=Identity(), grid=(4, 4), config=cfg)


@pytest.mark.parametrize("kw", [{}, {"reconstructor": "cnn"}, {"attention": False}, {"aux_query": False}])
def test_shapes_of_every_variant(kw):
    f, f_hat = _model(**kw)(torch.rand(2, 3, 4, 4))
    assert f.shape == f_hat.shape == (2, 3, 4, 4)


def test_multiscale_features_of_lite0():
    from uadkit import backbones

    emb = A.MultiScaleFeatures(backbone=backbones.create("efficientnet_lite0"), layers=(0, 1, 2, 3), stride=8)
    f = emb(torch.rand(2, 3, 64, 64))
    assert f.shape == (2, 16 + 24 + 40 + 112, 8, 8) and emb.channels == 192
    assert A.PixelPatches(stride=8)(torch.rand(2, 3, 64, 64)).shape == (2, 192, 8, 8)


def test_decoder_never_sees_the_encoder_input_directly():
    """With the auxiliary query the decoder's tokens start from q; f reaches them only through
    cross-attention into the encoder output. Without the query, they start from that output."""
    rec = A.TransformerReconstructor(tokens=4, dim=8, heads=2, ffn=16, encoder_layers=1, decoder_layers=1,
                                     attention=True, aux_query=True)
    seen = {}
    rec.decoder[0].register_forward_pre_hook(lambda mod, args: seen.update(t=args[0], memory=args[1]))
    x = torch.randn(2, 4, 8)
    rec(x)
    assert torch.equal(seen["t"], rec.query.expand(2, -1, -1))  # the decoder input is q, whatever x is
    assert not torch.equal(seen["memory"], x)  # and memory is the encoder's output, not x
    no_query = A.TransformerReconstructor(tokens=4, dim=8, heads=2, ffn=16, encoder_layers=1, decoder_layers=1,
                                          attention=True, aux_query=False)
    no_query.decoder[0].register_forward_pre_hook(lambda mod, args: seen.update(t=args[0], memory=args[1]))
    no_query(x)
    assert torch.equal(seen["t"], seen["memory"])


def test_without_attention_tokens_do_not_mix():
    rec = A.TransformerReconstructor(tokens=4, dim=8, heads=2, ffn=16, encoder_layers=1, decoder_layers=1,
                                     attention=False, aux_query=False)
    x = torch.randn(1, 4, 8)
    y = x.clone()
    y[0, 2] += 1.0  # change one token
    changed = (rec(x) - rec(y)).abs().sum(-1)[0]
    assert changed[2] > 0 and torch.all(changed[[0, 1, 3]] == 0)


def test_map_and_score_by_hand():
    f = torch.zeros(1, 2, 2, 2)
    f_hat = torch.zeros(1, 2, 2, 2)
    f[0, :, 1, 1] = torch.tensor([3.0, 4.0])  # d(:, u) = (3, 4) at one cell → s(u) = 5
    s = A.anomaly_map(f, f_hat, (2, 2))
    assert s[0, 0, 1, 1] == 5 and s.sum() == 5
    assert A.image_score(s, 1).item() == 5 and A.image_score(torch.ones(1, 1, 4, 4), 3).item() == 1.0


def test_losses_by_hand():
    f, f_hat = torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2)
    f[0, :, 0, 0] = torch.tensor([1.0, 2.0])
    assert A.feature_mse(f, f_hat).item() == pytest.approx((1 + 4) / 2)  # Eq. (1): Σ_c over HW = 2 cells
    d = torch.tensor([[[[2.0, 0.0]], [[-4.0, 0.0]]]])  # B=1, C=2, h=1, w=2
    phi = A.pseudo_huber(d)  # Eq. (6): mean |d| = 3 at u0, 0 at u1
    assert phi[0, 0, 0].item() == pytest.approx(math.sqrt(10) - 1) and phi[0, 0, 1] == 0
    y = torch.tensor([[[1.0, 0.0]]])
    expected = 0 / 2 - 0.5 * math.log(1 - math.exp(-(math.sqrt(10) - 1) / 2))  # Eq. (7), α = 0.5
    assert A.push_pull_loss(phi, y, 0.5).item() == pytest.approx(expected, rel=1e-4)
    assert A.push_pull_loss(phi, torch.zeros_like(y), 0.5).item() == pytest.approx((math.sqrt(10) - 1) / 2)
    q = (math.sqrt(10) - 1 + 0) / 2  # Eq. (8): top-2 mean
    assert A.topk_image_loss(phi, torch.tensor([0]), 2, 0.5).item() == pytest.approx(q)
    assert A.topk_image_loss(phi, torch.tensor([1]), 2, 0.5).item() == pytest.approx(-0.5 * math.log(1 - math.exp(-q)), rel=1e-4)


def test_short_training_lowers_the_loss_and_resumes(tmp_path):
    train = get_dataset("mini/brick", "train", n_train=20, image_size=32)
    det = uadkit.models.create("adtr", progress=False, epochs=12, lr_drop_epoch=11, batch_size=10)
    det.fit(train, checkpoint=tmp_path / "adtr.pt")
    assert det.history[-1] < 0.9 * det.history[0]  # 24 steps on 20 images: a clear, not a large, drop
    first = {k: v.clone() for k, v in det.model.state_dict().items()}
    again = uadkit.models.create("adtr", progress=False, epochs=12, lr_drop_epoch=11, batch_size=10)
    again.fit(train, checkpoint=tmp_path / "adtr.pt")  # finished checkpoint: nothing left to train
    assert all(torch.equal(v, first[k]) for k, v in again.model.state_dict().items())
    scores, maps = det.predict(get_dataset("mini/brick", "test", n_train=20, n_test=3, n_anomalous=3, image_size=32))
    assert scores.shape == (6,) and maps.shape == (6, 1, 32, 32)


def test_finetune_with_pixel_and_image_labels():
    from uadkit import synth

    train = get_dataset("mini/gravel", "train", n_train=10, image_size=32)
    det = uadkit.models.create("adtr", progress=False, epochs=1, lr_drop_epoch=1, batch_size=10).fit(train)
    g = torch.Generator().manual_seed(0)
    pairs = [synth.confetti_noise(train[i]["image"], generator=g) for i in range(5)]
    images, masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    assert len(det.finetune(train.images, (images, masks), labels="pixel", epochs=2)) == 2
    other = get_dataset("mini/grass", "train", n_train=5, image_size=32).images
    assert len(det.finetune(train.images, other, labels="image", epochs=1, k=4)) == 1
    with pytest.raises(ValueError, match="labels"):
        det.finetune(train.images, other, labels="box", epochs=1)


def test_finetune_drops_the_lr_at_two_thirds_like_epoch_200_of_300(monkeypatch):
    train = get_dataset("mini/gravel", "train", n_train=10, image_size=32)
    det = uadkit.models.create("adtr", progress=False, epochs=1, lr_drop_epoch=1, batch_size=10).fit(train)
    drops = []
    monkeypatch.setattr(det, "_train", lambda *a, drop, **kw: drops.append(drop) or [0.0])
    det.finetune(train.images, None, labels="none", epochs=300)
    det.finetune(train.images, None, labels="none", epochs=5, lr_drop_epoch=4)
    assert drops == [200, 4]


def test_paper_profile_on_a_fake_mvtec_tree(tmp_path, monkeypatch):
    """The paper profile's code path (EfficientNet-B4 layer1-5 = 720 channels, 4+4 layers, width 256)
    on a miniature MVTec tree, with randomly initialised B4 weights placed in the weights cache."""
    import timm

    from test_data_folders import make_mvtec_tree
    from uadkit import backbones

    monkeypatch.setenv("UADKIT_WEIGHTS", str(tmp_path / "weights"))
    backbones.weights_path("efficientnet_b4").parent.mkdir(parents=True)
    torch.save(timm.create_model("efficientnet_b4").state_dict(), backbones.weights_path("efficientnet_b4"))
    make_mvtec_tree(tmp_path)
    train = get_dataset("mvtec/bottle", "train", root=tmp_path, image_size=64)
    test = get_dataset("mvtec/bottle", "test", root=tmp_path, image_size=64)
    det = uadkit.models.create("adtr", profile="paper", device="cpu", epochs=1, lr_drop_epoch=1, batch_size=2,
                               progress=False)
    assert det.embed.channels == 720 and det.config.dim == 256 and det.config.encoder_layers == 4
    scores, maps = det.fit(train).predict(test)
    assert scores.shape == (3,) and maps.shape == (3, 1, 64, 64) and torch.isfinite(maps).all()


def test_create_batch_size_is_the_training_batch(monkeypatch):
    """create("adtr", batch_size=128) is the paper's CIFAR-10 setting: it must be the batch ADTR trains at."""
    assert uadkit.models.create("adtr", profile="paper", batch_size=128, pretrained=False).config.batch_size == 128
    seen = []
    real_fit = A.train.fit
    monkeypatch.setattr(A.train, "fit", lambda model, loss, data, **kw: seen.append(data.batch_size) or
                        real_fit(model, loss, data, **kw))
    train = get_dataset("mini/brick", "train", n_train=14, image_size=32)
    det = uadkit.models.create("adtr", progress=False, epochs=1, lr_drop_epoch=1, batch_size=7).fit(train)
    assert det.config.batch_size == 7 and seen == [7]


def test_feature_store_in_memory_and_on_disk_agree():
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(n, 5, 3, 2, generator=g), torch.rand(n, 3, 2, generator=g)) for n in (4, 4, 3)]
    stores = []
    for mb in (100, 0):
        store = A.FeatureStore(memory_mb=mb)
        for f, y in chunks:
            store.add(f, y)
        stores.append(store.finish())
    ram, disk = stores
    assert not ram.on_disk and disk.on_disk and len(ram) == len(disk) == 11 and disk.grid == (3, 2)
    for i in range(11):
        assert all(torch.equal(a, b) for a, b in zip(ram[i], disk[i]))
    assert torch.allclose(ram.mean(), disk.mean(), atol=1e-6)
    folder = disk.folder.name
    disk.close()
    import os
    assert not os.path.exists(folder)
    spilled = A.FeatureStore(memory_mb=0.0002)  # 4×5×3×2 floats = 480 B fit, the second chunk spills to disk
    for f, y in chunks:
        spilled.add(f, y)
    spilled.finish()
    assert spilled.on_disk and all(torch.equal(a, b) for a, b in zip(spilled[5], ram[5]))
    assert torch.allclose(spilled.mean(), ram.mean(), atol=1e-6)
    spilled.close()


def test_chunks_cut_like_the_concatenation():
    parts = [(torch.arange(n),) for n in (3, 5, 1, 4)]
    out = [c[0].tolist() for c in A._chunks(iter(parts), 4)]
    assert out == [[0, 1, 2, 0], [1, 2, 3, 4], [0, 0, 1, 2], [3]]


def test_fit_on_disk_features_trains_like_in_memory():
    """The paper profile keeps no training features in memory: the same fit, from files, ends where
    the in-memory one does (only the mean feature that initialises the bias is summed in another order)."""
    train = get_dataset("mini/brick", "train", n_train=12, image_size=32)
    runs = [uadkit.models.create("adtr", progress=False, epochs=2, lr_drop_epoch=2, batch_size=4,
                                 features_in_memory_mb=mb).fit(train) for mb in (1024, 0)]
    assert runs[0].history == pytest.approx(runs[1].history, rel=1e-4)


def test_finetune_reads_datasets_and_synthesised_streams():
    """ADTR+ takes datasets and anomalies synthesised while they are read, as it takes tensors, with the same result."""
    from uadkit import synth

    train = get_dataset("mini/gravel", "train", n_train=6, image_size=32)
    other = get_dataset("mini/grass", "train", n_train=4, image_size=32)
    base = uadkit.models.create("adtr", progress=False, epochs=1, lr_drop_epoch=1, batch_size=4).fit(train)
    import copy

    def confetti(n):
        g = torch.Generator().manual_seed(0)
        return [synth.confetti_noise(train[i]["image"], generator=g) for i in range(n)]

    pairs = confetti(6)
    a, b, c, d = (copy.deepcopy(base) for _ in range(4))
    a.finetune(train.images, (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])), labels="pixel", epochs=2)
    b.finetune(train, ({"image": x, "mask": m} for x, m in confetti(6)), labels="pixel", epochs=2)
    c.finetune(train.images, other.images, labels="image", epochs=1, k=4)
    d.finetune(train, other, labels="image", epochs=1, k=4)
    assert a.history == b.history and c.history == d.history


def test_detectors_share_one_frozen_backbone():
    import copy

    one, two = (uadkit.models.create("adtr", progress=False) for _ in range(2))
    assert one.embed.backbone is two.embed.backbone
    train = get_dataset("mini/brick", "train", n_train=4, image_size=32)
    one = uadkit.models.create("adtr", progress=False, epochs=1, lr_drop_epoch=1, batch_size=4).fit(train)
    twin = copy.deepcopy(one)
    assert twin.embed is one.embed and twin.model.embed is one.embed
    assert twin.model.expand.weight is not one.model.expand.weight
    assert not any(k.startswith("embed") for k in one.model.state_dict())  # checkpoints hold what trains


def test_training_step_and_prediction_on_the_meta_device():
    """Everything a step and a prediction build lives on the input's device (a CPU tensor would raise here)."""
    from uadkit import backbones

    cfg = A.ADTRConfig.for_profile("paper")
    det = uadkit.models.create("adtr", profile="paper", pretrained=False, progress=False)
    det.embed = A.MultiScaleFeatures(backbone=backbones.create(cfg.backbone, pretrained=False), layers=cfg.layers,
                                     stride=cfg.feature_stride).to("meta")  # a private copy: the shared one stays put
    det.model = A.ADTRModel(embed=det.embed, grid=(16, 16), config=cfg).to("meta")
    f = torch.ones(2, 720, 16, 16, device="meta")
    phi = A.pseudo_huber(A.feature_difference(f, det.model.reconstruct(f)))
    loss = (A.feature_mse(f, det.model.reconstruct(f)) + A.push_pull_loss(phi, torch.ones(2, 16, 16, device="meta"), 0.003)
            + A.topk_image_loss(phi, torch.ones(2, device="meta"), 20, 0.003))
    loss.backward()
    assert det.model.expand.weight.grad.device.type == "meta"
    scores, maps = det._predict_batch(torch.ones(2, 3, 256, 256, device="meta"))
    assert scores.shape == (2,) and maps.shape == (2, 1, 256, 256) and maps.device.type == "meta"


@pytest.mark.paper_memory
def test_fit_memory_does_not_grow_with_the_training_set(tmp_path):
    """Paper profile at 256 px (EfficientNet-B4 layer1-5, 720 channels on 16×16): the old fit held every
    training image and its features at once (0.8 + 0.7 MB per image, copies included +275 MB from 16 to
    128 images); now the features go to a file batch by batch and are read back per batch. Margin: 60 MB."""
    from memory import fit_peaks_mb

    small, large = fit_peaks_mb("adtr", (16, 128), tmp_path)
    assert large - small < 60, f"peak memory grew from {small:.0f} MB (16 images) to {large:.0f} MB (128 images)"
