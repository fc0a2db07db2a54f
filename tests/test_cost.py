"""Paper-run cost estimates (uadkit.cost) count on the meta device and add up as documented."""
import pytest
import torch

from uadkit import cost


def test_measure_counts_a_linear_layer_exactly():
    layer = torch.nn.Linear(64, 32).to("meta")
    x = torch.randn(8, 64, device="meta")
    step = cost.measure(lambda: layer(x).sum().backward(), layer)
    # forward 2·8·64·32 multiply-adds, backward as much again for the weight's gradient (x needs none)
    assert step.flops == 2 * 2 * 8 * 64 * 32
    assert step.param_bytes == (64 * 32 + 32) * 4 == step.trainable_bytes
    assert step.activation_bytes >= 8 * 64 * 4  # the input is saved for the weight's gradient


def test_estimate_is_arithmetic_on_the_step():
    step = cost.StepCost(flops=int(1e15), activation_bytes=int(4e9), param_bytes=int(1e9), trainable_bytes=int(1e9))
    e = cost.estimate(step, steps=1000, gpu="A100")
    assert e["GPU-hours"] == pytest.approx(1e18 / (312e12 * cost.UTILISATION) / 3600)
    assert e["peak GB"] == pytest.approx(1.2 * (1 + 3 + 2))  # bf16 halves the saved activations
    assert e["fits"] and not cost.estimate(step, steps=1, gpu="T4", amp=False)["peak GB"] < 16 * 0.5
    with pytest.raises(KeyError, match="A100"):
        cost.estimate(step, steps=1, gpu="V100")


def test_frozen_parameters_are_not_trained():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to("meta")
    net[0].requires_grad_(False)
    x = torch.randn(2, 4, device="meta")
    step = cost.measure(lambda: net(x).sum().backward(), net)
    assert step.trainable_bytes == (4 * 2 + 2) * 4 and step.param_bytes == step.trainable_bytes + (16 + 4) * 4
