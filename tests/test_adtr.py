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
