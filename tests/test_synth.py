"""Training-time synthesis: shapes, ranges, masks that mark exactly what changed, repeatability."""
import pytest
import torch

from uadkit import synth

FUNCS = [synth.confetti_noise, synth.perlin_anomaly, synth.cutpaste,
         lambda x, generator: synth.cutpaste(x, generator=generator, scar=True)]


@pytest.mark.parametrize("fn", FUNCS)
def test_shapes_masks_and_determinism(fn):
    x = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(1))
    out, mask = fn(x, generator=torch.Generator().manual_seed(0))
    again, mask2 = fn(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and mask.shape == (1, 48, 48)
    assert 0 <= out.min() and out.max() <= 1 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum() > 0 and torch.equal(out, again) and torch.equal(mask, mask2)
    changed = (out - x).abs().amax(0, keepdim=True) > 0
    assert not (changed & (mask == 0)).any(), "pixels changed outside the mask"


def test_perlin_noise_range_and_smoothness():
    n = synth.perlin_noise_2d((64, 64), (4, 4), generator=torch.Generator().manual_seed(0))
    assert n.shape == (64, 64) and n.abs().max() <= 1.5
    assert (n[1:] - n[:-1]).abs().max() < 0.3  # smooth: neighbouring values are close


def test_perlin_blend_formula_with_source():
    x, src = torch.full((3, 32, 32), 0.2), torch.full((3, 32, 32), 0.8)
    out, m = synth.perlin_anomaly(x, src, generator=torch.Generator().manual_seed(3), beta_range=(0.5, 0.5))
    inside = out[:, m[0] > 0]
    assert torch.allclose(inside, torch.full_like(inside, 0.5 * 0.8 + 0.5 * 0.2))


def test_synthesize_batch_labels_match_masks():
    imgs = torch.rand(16, 3, 32, 32)
    out, masks, labels = synth.synthesize_batch(imgs, "confetti", generator=torch.Generator().manual_seed(0), p=0.5)
    assert 0 < labels.sum() < 16
    assert torch.equal(masks.flatten(1).sum(1) > 0, labels.bool())
    assert torch.equal(out[labels == 0], imgs[labels == 0])
    with pytest.raises(ValueError, match="kind"):
        synth.synthesize_batch(imgs, "sparkles", generator=torch.Generator())
