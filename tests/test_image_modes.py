"""Images of every common mode load to [0, 1] at their true brightness (16-bit and float medical images included)."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from uadkit.data.base import load_image


def _ramp(h=32, w=40):
    return np.linspace(0, 1, h * w).reshape(h, w)


def test_16_bit_png_keeps_its_brightness(tmp_path):
    true = _ramp()
    Image.fromarray((true * 65535).round().astype(np.uint16)).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (3, 32, 40) and abs(x.mean().item() - true.mean()) < 1e-3  # clipping gave 0.999
    assert torch.allclose(x[0], x[2])


def test_32_bit_integer_image_in_16_bit_range(tmp_path):
    true = _ramp()
    Image.fromarray((true * 65535).round().astype(np.int32), mode="I").save(tmp_path / "a.tif")
    assert abs(load_image(tmp_path / "a.tif", size=16).mean().item() - true.mean()) < 2e-3


def test_32_bit_integers_without_a_scale_are_an_error_naming_the_file(tmp_path):
    Image.fromarray(np.full((8, 8), -1000, dtype=np.int32), mode="I").save(tmp_path / "ct.tif")
    with pytest.raises(OSError, match="ct.tif.*no fixed scale"):
        load_image(tmp_path / "ct.tif")


def test_float_image_as_given_and_clipped_with_a_warning(tmp_path):
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert torch.allclose(load_image(tmp_path / "f.tif"), torch.full((3, 8, 8), 0.25))  # was all zeros
    Image.fromarray(np.full((8, 8), 3.0, dtype=np.float32), mode="F").save(tmp_path / "big.tif")
    with pytest.warns(UserWarning, match="clipped"):
        assert load_image(tmp_path / "big.tif").max().item() == 1.0


def test_8_bit_images_unchanged(tmp_path):
    arr = (np.random.default_rng(0).random((8, 8, 4)) * 255).astype(np.uint8)
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(arr[..., 0], mode="L").save(tmp_path / "l.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(load_image(tmp_path / "rgba.png"), torch.from_numpy(arr[..., :3] / 255).permute(2, 0, 1).float())
        assert torch.allclose(load_image(tmp_path / "l.png")[1], torch.from_numpy(arr[..., 0] / 255).float())
