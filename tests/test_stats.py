import math

import torch

from gradwatch.activations import get_activation
from gradwatch.stats import activation_region_stats, output_moments, squared_norm


def test_squared_norm_and_moments():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert squared_norm(x).item() == 25.0
    mean, std = output_moments(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist()
    assert mean == 2.5 and abs(std - math.sqrt(1.25)) < 1e-7


def test_sigmoid_regions_on_constructed_inputs():
    # 8 inputs: 4 in the green region (|x| <= 1.76), 3 saturated (phi' < 0.025 <=> |x| > 3.63)
    x = torch.tensor([[0.0, 1.0, -1.5, 1.7, 2.5, 4.0, -6.0, 10.0]])
    sat, green, dead, mean_d = activation_region_stats(x, get_activation("sigmoid")).tolist()
    assert green == 4 / 8
    assert sat == 3 / 8
    assert dead == 0.0  # a sigmoid's derivative is never exactly zero
    s = torch.sigmoid(x)
    assert abs(mean_d - (s * (1 - s)).mean().item()) < 1e-7


def test_relu_dead_units_and_no_saturation():
    # batch of 4, 5 units; units 1 and 3 are negative for every sample: dead
    x = torch.tensor(
        [[1.0, -1.0, 2.0, -3.0, 0.5], [-1.0, -2.0, 1.0, -1.0, 0.5], [2.0, -0.5, -1.0, -0.1, -1.0], [1.0, -3.0, 1.0, -2.0, 1.0]]
    )
    sat, green, dead, mean_d = activation_region_stats(x, get_activation("relu")).tolist()
    assert math.isnan(sat)  # ReLU has no flat tails: its zero side is measured as dead
    assert abs(dead - 2 / 5) < 1e-7
    positive = (x > 0).float().mean().item()
    assert abs(green - positive) < 1e-7 and abs(mean_d - positive) < 1e-7


def test_conv_units_are_channels():
    # (N, C, H, W): channel 0 all negative (dead), channel 1 has one positive pixel (alive)
    x = -torch.ones(2, 3, 4, 4)
    x[1, 1, 2, 2] = 1.0
    x[:, 2] = 1.0
    _, _, dead, _ = activation_region_stats(x, get_activation("relu"), channels_first=True).tolist()
    assert abs(dead - 1 / 3) < 1e-7
    # the same tensor read with units on the last dim (W=4): no column is all-negative
    _, _, dead_last, _ = activation_region_stats(x, get_activation("relu"), channels_first=False).tolist()
    assert dead_last == 0.0


def test_tanh_regions():
    t = get_activation("tanh")
    # green: 1 - tanh^2 >= 0.5 <=> |x| <= atanh(sqrt(0.5)) = 0.8814
    x = torch.tensor([0.0, 0.88, 0.89, 3.0])
    sat, green, _, _ = activation_region_stats(x[None], t).tolist()
    assert green == 2 / 4
    assert sat == 1 / 4  # 1 - tanh(3)^2 = 0.0099 < 0.1
