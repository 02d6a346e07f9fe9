import math

import pytest
import torch

from gradwatch.activations import activation_names, get_activation
from gradwatch.stats import (
    activation_region_stats,
    moments_from_sums,
    output_moments,
    sample_index,
    squared_norm,
)


def test_squared_norm_and_moments():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert squared_norm(x).item() == 25.0
    total, norm = output_moments(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist()
    mean, std = moments_from_sums(total, norm**2, 4)
    assert abs(mean - 2.5) < 1e-7 and abs(std - math.sqrt(1.25)) < 1e-6


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
        [
            [1.0, -1.0, 2.0, -3.0, 0.5],
            [-1.0, -2.0, 1.0, -1.0, 0.5],
            [2.0, -0.5, -1.0, -0.1, -1.0],
            [1.0, -3.0, 1.0, -2.0, 1.0],
        ]
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


def _exact(x, act, channels_first=False):
    d = act.derivative(x).abs().double()  # in the dtype the network computes: e^-200 is 0 in float32
    m = act.max_derivative
    dim = 1 if (x.ndim == 2 or channels_first) else x.ndim - 1
    others = [i for i in range(x.ndim) if i != dim]
    dead = (d.amax(dim=others) <= 0).double().mean().item()
    sat = (d < 0.1 * m).double().mean().item() if act.saturating else math.nan
    return [sat, (d >= 0.5 * m).double().mean().item(), dead, d.mean().item()]


@pytest.mark.parametrize("name", activation_names())
def test_dead_shortcut_equals_full_computation(name):
    act = get_activation(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, generator=g) * 3
    x[:, :10] = -200 - torch.rand(64, 10, generator=g)  # dead for ReLU-likes
    x[:, 10:20] = 200 + torch.rand(
        64, 10, generator=g
    )  # dead for sigmoid/tanh/softsign (flat, phi' = 0 in float32)
    got = activation_region_stats(x, act).tolist()
    want = _exact(x, act)
    assert got[2] == pytest.approx(want[2], abs=1e-7)
    for a, b in zip(got[:2] + got[3:], want[:2] + want[3:], strict=True):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-5


def test_sampled_fractions_are_close_and_dead_stays_exact():
    act = get_activation("tanh")
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) * 2
    x[:, :32] = 50.0
    idx = sample_index(x.numel(), 4096, x.device)
    got = activation_region_stats(x, act, sample=idx).tolist()
    want = _exact(x, act)
    for k in (0, 1):  # fractions: within 3 standard errors of a 4096 sample
        assert abs(got[k] - want[k]) < 3 * 0.5 / math.sqrt(4096)
    assert got[2] == pytest.approx(32 / 256)
    assert sample_index(100, 4096, x.device) is None  # small inputs: every element


@pytest.mark.parametrize("name", activation_names())
def test_batched_stats_equal_one_by_one(name):
    from gradwatch.stats import activation_inputs, batched_region_stats

    act = get_activation(name)
    g = torch.Generator().manual_seed(3)
    xs = [
        torch.randn(32, 20, generator=g) * 3,
        torch.randn(8, 4, 5, 5, generator=g),
        torch.randn(600, 16, generator=g),
    ]
    xs[0][:, :5] = -300.0
    xs[1][:, 1] = 300.0
    idx = sample_index(xs[2].numel(), 4096, xs[2].device)
    kept, single = [], []
    for x, cf in zip(xs, (False, True, False), strict=True):
        s = idx if x is xs[2] else None
        kept.append(activation_inputs(x, act, channels_first=cf, sample=s))
        single.append(activation_region_stats(x, act, channels_first=cf, sample=s))
    torch.testing.assert_close(
        batched_region_stats(kept, act), torch.stack(single), equal_nan=True, atol=1e-6, rtol=1e-5
    )
    # layers of one shape: the (layers, n) fast path, against the general one (mixed sizes)
    same = [torch.randn(32, 20, generator=g) * 3 for _ in range(4)]
    same[1][:, :7] = -300.0
    kept_same = [activation_inputs(x, act) for x in same]
    fast = batched_region_stats(kept_same, act)
    general = batched_region_stats(kept_same + kept[1:2], act)[:4]
    torch.testing.assert_close(fast, general, equal_nan=True, atol=1e-6, rtol=1e-5)
    if name not in ("leaky_relu", "softsign"):  # phi'(-300) is 0.01 and 1e-5 there; 0 elsewhere
        assert fast[1, 2] >= 7 / 20  # the 7 units set to -300 are dead


@pytest.mark.parametrize("n", [1, 2, 7, 256, 2048])
def test_input_quantiles_equal_torch_quantile_bitwise(n):
    """The watcher's quantiles (one sort, one lerp) are torch.quantile's, NaN and inf rows included."""
    from gradwatch.stats import INPUT_QUANTILES, QUANTILE_SAMPLE, input_quantiles

    rows = torch.randn(20, n, generator=torch.Generator().manual_seed(n))
    rows[3, 0] = float("nan")
    rows[5, -1] = float("inf")
    rows[6, : min(2, n)] = float("-inf")
    got = input_quantiles(list(rows))
    strided = rows[:, :: n // QUANTILE_SAMPLE][:, :QUANTILE_SAMPLE] if n > QUANTILE_SAMPLE else rows
    want = torch.quantile(strided, torch.tensor(INPUT_QUANTILES), dim=1).T
    assert got.shape == (20, len(INPUT_QUANTILES))
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan()[3].all()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("params", [("leaky_relu", {"negative_slope": -0.5}), ("elu", {"alpha": -1.0})])
def test_region_stats_of_negative_slopes_use_the_absolute_derivative(params):
    """phi' < 0 on the negative side: the mean derivative and the fractions are of |phi'|."""
    from gradwatch.stats import activation_inputs, batched_region_stats

    name, kwargs = params
    act = get_activation(name, **kwargs)
    x = -torch.rand(16, 8) - 0.1  # all inputs negative
    mean_abs = act.derivative(x).abs().mean().item()
    kept = [activation_inputs(x, act), activation_inputs(x.clone(), act)]  # the (layers, n) path
    stats = batched_region_stats(kept, act)
    assert stats[:, 3].tolist() == pytest.approx([mean_abs, mean_abs], rel=1e-6)
    assert (stats[:, 3] > 0).all()
