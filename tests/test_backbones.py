"""Backbones: offline ImageNet weights are right, missing weights fail fast, everything is frozen."""
import time

import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from uadkit import backbones

IMAGENET_EGYPTIAN_CAT, IMAGENET_TABBY, IMAGENET_TIGER_CAT, IMAGENET_ESPRESSO = 285, 281, 282, 967


def _prepare(img):
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def test_efficientnet_lite0_weights_classify_imagenet_pictures():
    net = backbones.classifier("efficientnet_lite0")
    with torch.no_grad():
        cat = net(_prepare(skdata.chelsea())).argmax().item()
        coffee = net(_prepare(skdata.coffee())).argmax().item()
    assert cat in (IMAGENET_EGYPTIAN_CAT, IMAGENET_TABBY, IMAGENET_TIGER_CAT)
    assert coffee == IMAGENET_ESPRESSO


def test_mobilenet_v2_weights_classify_coffee_as_espresso():
    net = backbones.classifier("mobilenet_v2")
    with torch.no_grad():
        assert net(_prepare(skdata.coffee())).argmax().item() == IMAGENET_ESPRESSO
    feats = backbones.create("mobilenet_v2")(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [16, 24, 32, 96, 320]
    assert [64 // f.shape[-1] for f in feats] == [2, 4, 8, 16, 32]


def test_feature_pyramid_shapes_and_frozen():
    net = backbones.create("efficientnet_lite0")
    feats = net(torch.rand(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == net.channels == [16, 24, 40, 112, 320]
    assert [64 // f.shape[-1] for f in feats] == net.strides == [2, 4, 8, 16, 32]
    assert not any(p.requires_grad for p in net.parameters())
    parent = torch.nn.Sequential(net)
    parent.train()
    assert not net.training and not net.model.training
    with pytest.raises(ValueError, match="B×3×H×W"):
        net(torch.rand(2, 1, 64, 64))


def test_random_weights_differ_from_pretrained():
    a, b = backbones.create("efficientnet_lite0"), backbones.create("efficientnet_lite0", pretrained=False)
    x = torch.rand(1, 3, 64, 64)
    assert not torch.allclose(a(x)[-1], b(x)[-1])


@pytest.mark.parametrize("name", ["efficientnet_b4", "wide_resnet50_2", "resnet18", "dinov2_vitl14_reg", "dino_vitb8", "mae_vitl16"])
def test_missing_weights_fail_fast_and_name_the_script(name, tmp_path, monkeypatch):
    monkeypatch.setenv("UADKIT_WEIGHTS", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(backbones.WeightsUnavailable, match="python -m uadkit.fetch weights"):
        backbones.create(name)
    assert time.perf_counter() - t < 5


def test_cached_weights_are_used(tmp_path, monkeypatch):
    """A file in the weights cache is loaded without any network (resnet18 with random weights saved)."""
    import timm

    monkeypatch.setenv("UADKIT_WEIGHTS", str(tmp_path))
    ref = timm.create_model("resnet18", pretrained=False)
    torch.save(ref.state_dict(), backbones.weights_path("resnet18"))
    net = backbones.create("resnet18")
    assert torch.equal(net.model.conv1.weight, ref.conv1.weight)
    assert net.channels == [64, 64, 128, 256, 512]


def test_vit_token_maps(tmp_path, monkeypatch):
    """ViT entries return one B×D×h×w patch-token map per block (tested with a tiny random ViT)."""
    import timm

    monkeypatch.setitem(backbones.REGISTRY, "tiny_vit", backbones.Entry("vit_tiny_patch16_224", "vit", "cache"))
    net = backbones.create("tiny_vit", pretrained=False)
    maps = net(torch.rand(1, 3, 224, 224))
    assert len(maps) == 12 and maps[0].shape == (1, 192, 14, 14)


def test_unknown_backbone():
    with pytest.raises(KeyError, match="available"):
        backbones.create("vgg99")


def test_resize_aligned_keeps_cell_centres_on_their_pixels():
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 2, 1] = 1.0  # cell (2, 1) of a stride-4 grid over a 16×16 image is centred on pixel (8, 4)
    up = backbones.resize_aligned(m, (16, 16))
    assert up.shape == (1, 1, 16, 16)
    assert divmod(int(up.argmax()), 16) == (8, 4) and up.max() == 1.0
    assert torch.equal(backbones.resize_aligned(m, (4, 4)), m)


def test_a_corrupt_weights_file_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("UADKIT_WEIGHTS", str(tmp_path))
    path = backbones.weights_path("resnet18")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(backbones.WeightsUnavailable, match=f"{path.name}.*cannot be read.*uadkit.fetch weights resnet18"):
        backbones.create("resnet18")


def test_fetch_weights_fails_fast_offline():
    from uadkit.fetch import weights

    t = time.perf_counter()
    with pytest.raises(SystemExit, match="cannot reach"):
        weights._reachable_or_exit("uadkit-unreachable.invalid", timeout=2)
    assert time.perf_counter() - t < 4
