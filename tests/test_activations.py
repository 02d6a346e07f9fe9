import math

import pytest
import torch
from torch import nn

from gradwatch.activations import activation_for_module, activation_names, get_activation
from gradwatch.errors import ConfigError


@pytest.mark.parametrize("name", activation_names())
def test_derivative_matches_autograd(name):
    act = get_activation(name)
    x = torch.linspace(-8, 8, 40001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act.phi(x).sum(), x)
    torch.testing.assert_close(act.derivative(x.detach()), g, atol=1e-12, rtol=0)
    # max_derivative is the true maximum of |phi'| (to 1e-6)
    assert (
        abs(act.derivative(x.detach()).abs().max().item() - act.max_derivative)
        < 1e-6 * max(1, act.max_derivative) + 1e-9
    )


def test_sigmoid_bound_and_green_region():
    sig = get_activation("sigmoid")
    assert sig.max_derivative == 0.25
    # green region: phi' >= 1/8  <=>  |x| <= ln(3 + sqrt 8) = 1.7627
    edge = math.log(3 + math.sqrt(8))
    d = sig.derivative(torch.tensor([edge - 1e-6, edge + 1e-6], dtype=torch.float64))
    assert d[0] >= sig.green_threshold() > d[1]


@pytest.mark.parametrize(
    "module, name",
    [
        pytest.param(nn.Sigmoid(), "sigmoid", id="sigmoid"),
        pytest.param(nn.ReLU(inplace=True), "relu", id="relu-inplace"),
        pytest.param(nn.LeakyReLU(0.2), "leaky_relu", id="leaky"),
        pytest.param(nn.ReLU6(), "hardtanh", id="relu6-is-hardtanh"),
        pytest.param(nn.GELU(approximate="tanh"), "gelu", id="gelu-tanh"),
    ],
)
def test_activation_for_module(module, name):
    act = activation_for_module(module)
    assert act is not None and act.name == name
    x = torch.randn(1000)
    torch.testing.assert_close(act.phi(x), module(x.clone()))


def test_leaky_params_carried():
    assert activation_for_module(nn.LeakyReLU(0.2)).params == {"negative_slope": 0.2}
    assert activation_for_module(nn.Linear(2, 2)) is None


def test_unknown_activation_lists_known():
    with pytest.raises(ConfigError, match=r"unknown activation 'swishy'; known: .*sigmoid.*tanh"):
        get_activation("swishy")
    with pytest.raises(ConfigError, match="takes no parameters"):
        get_activation("tanh", alpha=2)


@pytest.mark.parametrize(
    "name, params",
    [(n, {}) for n in activation_names()]
    + [("leaky_relu", {"negative_slope": -0.5}), ("elu", {"alpha": -1.0})],
)
def test_nonnegative_flag_matches_the_derivative(name, params):
    """``Activation.nonnegative`` (|phi'| taken as phi') holds exactly where phi' >= 0 on a dense grid."""
    act = get_activation(name, **params)
    x = torch.linspace(-20, 20, 100_001, dtype=torch.float64)
    assert act.nonnegative == bool((act.derivative(x) >= 0).all())


def test_key_tells_parameters_apart_and_matches_equal_modules():
    # the watcher measures calls of one key together: equal modules share it, other slopes do not
    a, b = activation_for_module(nn.LeakyReLU(0.1)), activation_for_module(nn.LeakyReLU(0.1))
    assert a.key == b.key and hash(a.key) == hash(b.key)
    assert a.key != activation_for_module(nn.LeakyReLU(0.2)).key
    assert get_activation("tanh").key == activation_for_module(nn.Tanh()).key == ("tanh", ())
