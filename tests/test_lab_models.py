import math

import pytest
import torch
from torch import nn

from gradwatch.activations import activation_names, get_activation
from gradwatch.errors import ConfigError
from gradwatch.lab.models import (
    INIT_NAMES,
    MLP,
    ConvNet,
    ModelConfig,
    activation_gain,
    build_model,
    count_parameters,
    describe,
    initialize_,
)

N = 512  # a 512 x 512 layer: 262,144 weights, sampling error of the variance ~0.3%


def _layer(n_out: int = N, n_in: int = N) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out)


def _assert_var(weight: torch.Tensor, expected: float, rel: float = 0.05) -> None:
    got = weight.double().var().item()
    assert got == pytest.approx(expected, rel=rel), (got, expected)


# --- inits: empirical variance against the formula -----------------------------------------


@pytest.mark.parametrize(
    ("init", "activation", "n_out", "n_in", "expected_var"),
    [
        pytest.param("default", "relu", N, N, 1 / (3 * N), id="default-1/(3n)"),
        pytest.param("standard", "relu", N, N, 1 / (3 * N), id="standard-1/(3n)"),
        pytest.param("xavier", "tanh", N, N, 2 / (N + N), id="xavier-square"),
        pytest.param("xavier", "tanh", 256, N, 2 / (N + 256), id="xavier-2/(in+out)"),
        pytest.param("he", "relu", N, N, 2 / N, id="he-relu-2/n"),
        pytest.param("he", "relu", 256, N, 2 / N, id="he-fan-in"),
        pytest.param("he", "tanh", N, N, (5 / 3) ** 2 / N, id="he-tanh-gain"),
        pytest.param("orthogonal", "sigmoid", N, N, 1 / N, id="orthogonal-1/n"),
    ],
)
def test_init_variance_matches_formula(init, activation, n_out, n_in, expected_var):
    layer = _layer(n_out, n_in)
    initialize_(layer, init, activation)
    _assert_var(layer.weight, expected_var)


def test_he_leaky_relu_uses_slope():
    layer = _layer()
    initialize_(layer, "he", get_activation("leaky_relu", negative_slope=0.5))
    _assert_var(layer.weight, 2 / ((1 + 0.5**2) * N))


def test_standard_and_default_bounds_and_biases():
    layer = _layer()
    initialize_(layer, "standard")
    assert layer.weight.abs().max().item() <= 1 / math.sqrt(N)
    assert layer.weight.abs().max().item() > 0.99 / math.sqrt(N)
    assert torch.all(layer.bias == 0)
    initialize_(layer, "default")  # PyTorch's: random biases in the same bound
    assert layer.bias.abs().max().item() <= 1 / math.sqrt(N)
    assert layer.bias.std().item() > 0.5 / math.sqrt(3 * N)


@pytest.mark.parametrize("init", ["xavier", "he", "orthogonal"])
def test_inits_zero_biases(init):
    layer = _layer(64, 64)
    initialize_(layer, init)
    assert torch.all(layer.bias == 0)


@pytest.mark.parametrize(
    ("activation", "n_out", "n_in"),
    [
        pytest.param("sigmoid", 256, 256, id="square-gain-1"),
        pytest.param("hardtanh", 128, 256, id="wide"),
        pytest.param("relu", 256, 256, id="relu-gain-sqrt2"),
    ],
)
def test_orthogonal_rows_orthonormal_times_gain(activation, n_out, n_in):
    layer = _layer(n_out, n_in)
    act = get_activation(activation)
    initialize_(layer, "orthogonal", act)
    w = layer.weight.double() / activation_gain(act)
    err = (w @ w.T - torch.eye(n_out, dtype=torch.float64)).abs().max().item()
    assert err < 1e-5


def test_orthogonal_conv_is_orthogonal_when_flattened():
    conv = nn.Conv2d(8, 16, 3)
    initialize_(conv, "orthogonal", "sigmoid")
    w = conv.weight.reshape(16, -1).double()
    assert torch.allclose(w @ w.T, torch.eye(16, dtype=torch.float64), atol=1e-5)


def test_scaled_matches_sigma_w2_over_fan_in_and_sigma_b2():
    torch.manual_seed(0)
    layer = nn.Linear(N, 4096)  # 4096 biases for the bias variance
    initialize_(layer, "scaled", "tanh", sigma_w2=2.5, sigma_b2=0.3)
    _assert_var(layer.weight, 2.5 / N)
    _assert_var(layer.bias, 0.3, rel=0.1)
    assert layer.weight.mean().abs().item() < 1e-3


def test_scaled_conv_uses_channels_times_kernel_as_fan_in():
    torch.manual_seed(0)
    conv = nn.Conv1d(64, 128, 5)
    initialize_(conv, "scaled", sigma_w2=2.0)
    _assert_var(conv.weight, 2.0 / (64 * 5))


def test_he_conv_fan_in():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3)
    initialize_(conv, "he", "relu")
    _assert_var(conv.weight, 2 / (32 * 9))


def test_build_model_applies_init_to_every_layer():
    model = build_model(ModelConfig(depth=3, width=512, init="he"), 512, 10, seed=0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            _assert_var(module.weight, 2 / module.in_features, rel=0.15 if name == "out" else 0.05)
            assert torch.all(module.bias == 0)


def test_activation_gains():
    assert activation_gain(get_activation("relu")) == pytest.approx(math.sqrt(2))
    assert activation_gain(get_activation("leaky_relu", negative_slope=0.2)) == pytest.approx(
        math.sqrt(2 / 1.04)
    )
    assert activation_gain(get_activation("tanh")) == pytest.approx(5 / 3)
    assert activation_gain(get_activation("sigmoid")) == 1.0


# --- structure -------------------------------------------------------------------------------


def test_mlp_named_modules_in_forward_order():
    model = build_model(ModelConfig(depth=3, width=8, activation="tanh"), 64, 10)
    seen: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(names[m]))
             for n, m in model.named_modules() if n and not list(m.children())]
    model(torch.randn(4, 64))
    for h in hooks:
        h.remove()
    expected = [f"hidden.{i}.{part}" for i in range(3) for part in ("linear", "act")] + ["out"]
    assert seen == expected
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    assert leaves == expected  # registration order is forward order
    assert all(isinstance(model.get_submodule(f"hidden.{i}.act"), nn.Tanh) for i in range(3))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_batch_norm_sits_before_each_activation(kind):
    config = ModelConfig(kind=kind, depth=4, width=8, batch_norm=True)
    model = build_model(config, (1, 8, 8), 10)
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    layer = "linear" if kind == "mlp" else "conv"
    for i in range(4):
        at = leaves.index(f"hidden.{i}.{layer}")
        assert leaves[at + 1 : at + 3] == [f"hidden.{i}.bn", f"hidden.{i}.act"]
        assert model.get_submodule(f"hidden.{i}.{layer}").bias is None  # BN's beta replaces it
    bn_type = nn.BatchNorm1d if kind == "mlp" else nn.BatchNorm2d
    assert sum(isinstance(m, bn_type) for m in model.modules()) == 4
    plain = build_model(ModelConfig(kind=kind, depth=4, width=8), (1, 8, 8), 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())


@pytest.mark.parametrize("activation", activation_names())
def test_every_registry_activation_builds_as_module(activation):
    model = build_model(ModelConfig(depth=2, width=4, activation=activation), 6, 3)
    act = model.get_submodule("hidden.1.act")
    assert isinstance(act, nn.Module)
    assert type(act) is type(get_activation(activation).make_module())
    assert model(torch.randn(2, 6)).shape == (2, 3)


def test_residual_depth_20_forward_and_differs_from_plain():
    plain_config = ModelConfig(depth=20, width=32, activation="sigmoid")
    res_config = ModelConfig(depth=20, width=32, activation="sigmoid", residual=True)
    plain = build_model(plain_config, 64, 10, seed=3)
    res = build_model(res_config, 64, 10, seed=3)
    # same seed, same shapes: identical weights, so only the skips differ
    for (_, p), (_, q) in zip(plain.named_parameters(), res.named_parameters(), strict=True):
        assert torch.equal(p, q)
    x = torch.randn(16, 64)
    y_plain, y_res = plain(x), res(x)
    assert y_res.shape == (16, 10)
    assert not torch.allclose(y_plain, y_res)
    # the skip keeps the input's influence: plain deep sigmoid nets forget x
    x2 = torch.randn(16, 64)
    assert (res(x2) - y_res).abs().mean() > 10 * (plain(x2) - y_plain).abs().mean()
    assert not res.get_submodule("hidden.0").residual  # first block projects 64 -> 32
    assert all(res.get_submodule(f"hidden.{i}").residual for i in range(1, 20))


def test_residual_passes_gradient_to_the_input_layer():
    torch.manual_seed(0)
    grads = {}
    for residual in (False, True):
        config = ModelConfig(depth=20, width=32, activation="sigmoid", residual=residual)
        model = build_model(config, 64, 10, seed=0)
        model(torch.randn(32, 64)).square().mean().backward()
        grads[residual] = model.get_submodule("hidden.0.linear").weight.grad.norm().item()
    assert grads[True] > 1000 * grads[False]


@pytest.mark.parametrize(
    ("input_shape", "conv_type", "x_shape"),
    [
        pytest.param((1, 8, 8), nn.Conv2d, (5, 1, 8, 8), id="digits-1x8x8"),
        pytest.param((1, 8, 8), nn.Conv2d, (5, 64), id="digits-flat"),
        pytest.param((1, 40), nn.Conv1d, (5, 1, 40), id="mnist1d-1x40"),
        pytest.param((1, 40), nn.Conv1d, (5, 40), id="mnist1d-flat"),
        pytest.param(40, nn.Conv1d, (5, 40), id="int-is-1d-signal"),
    ],
)
@pytest.mark.parametrize("residual", [False, True])
def test_cnn_forward_shapes(input_shape, conv_type, x_shape, residual):
    config = ModelConfig(kind="cnn", depth=3, width=8, residual=residual, batch_norm=True)
    model = build_model(config, input_shape, 10)
    assert isinstance(model, ConvNet)
    assert isinstance(model.get_submodule("hidden.0.conv"), conv_type)
    assert model(torch.randn(*x_shape)).shape == (5, 10)


def test_mlp_accepts_image_shaped_input():
    model = build_model(ModelConfig(depth=2, width=8), (1, 8, 8), 10)
    assert isinstance(model, MLP)
    assert model.get_submodule("hidden.0.linear").in_features == 64
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_seed_reproducible_and_leaves_global_rng_alone():
    config = ModelConfig(depth=3, width=16, init="xavier")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model(config, 10, 3, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model(config, 10, 3, seed=7)
    c = build_model(config, 10, 3, seed=8)
    wa, wb, wc = (m.get_submodule("hidden.1.linear").weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_count_parameters():
    model = build_model(ModelConfig(depth=2, width=8), 4, 3)
    assert count_parameters(model) == (4 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)
    model.get_submodule("out").weight.requires_grad_(False)
    assert count_parameters(model) == 4 * 8 + 8 + 8 * 8 + 8 + 3
    assert count_parameters(model, trainable_only=False) == 139
    bn = build_model(ModelConfig(depth=2, width=8, batch_norm=True), 4, 3)
    assert count_parameters(bn) == 4 * 8 + 2 * 8 + 8 * 8 + 2 * 8 + 8 * 3 + 3


# --- config ----------------------------------------------------------------------------------


def test_config_canonicalises_and_round_trips():
    config = ModelConfig(activation="LeakyReLU", activation_params={"negative_slope": 0.1})
    assert config.activation == "leaky_relu"
    assert config.activation_params == (("negative_slope", 0.1),)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(ModelConfig.from_dict(config.to_dict()))
    with pytest.raises(AttributeError):
        config.depth = 3  # frozen


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"activation": "sigmod"}, r"activation: unknown activation 'sigmod'; known: "
                     r"elu, gelu, .*sigmoid", id="activation"),
        pytest.param({"activation": "relu", "activation_params": {"slope": 1}},
                     r"activation: activation 'relu' takes no parameters", id="activation-params"),
        pytest.param({"init": "kaiming"}, r"init='kaiming' is not a known initialisation; "
                     r"expected one of default, standard, xavier, he, orthogonal, scaled",
                     id="init"),
        pytest.param({"depth": 0}, r"depth=0; expected an integer >= 1 \(the number of hidden",
                     id="depth-0"),
        pytest.param({"depth": 2.5}, r"depth=2.5; expected an integer >= 1", id="depth-float"),
        pytest.param({"width": 0}, r"width=0; expected an integer >= 1", id="width"),
        pytest.param({"kind": "rnn"}, r"kind='rnn' is not a model kind; expected one of mlp, cnn",
                     id="kind"),
        pytest.param({"kernel_size": 4}, r"kernel_size=4 is even; expected an odd size",
                     id="kernel-even"),
        pytest.param({"sigma_w2": 0.0}, r"sigma_w2=0.0; expected a finite number > 0",
                     id="sigma_w2"),
        pytest.param({"sigma_b2": -1.0}, r"sigma_b2=-1.0; expected a finite number >= 0",
                     id="sigma_b2"),
        pytest.param({"sigma_w2": float("nan")}, r"sigma_w2=nan", id="sigma_w2-nan"),
        pytest.param({"batch_norm": "yes"}, r"batch_norm='yes'; expected True or False",
                     id="batch_norm"),
    ],
)
def test_config_errors_name_field_value_and_choices(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_from_dict_unknown_field():
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) dept; known: kind, "):
        ModelConfig.from_dict({"dept": 3})


def test_build_model_errors():
    with pytest.raises(ConfigError, match=r"input_shape=\(1, 2, 3, 4\) for a cnn; expected"):
        build_model(ModelConfig(kind="cnn"), (1, 2, 3, 4), 10)
    with pytest.raises(ConfigError, match=r"input_shape=\(0, 8\); expected positive integers"):
        build_model(ModelConfig(), (0, 8), 10)
    with pytest.raises(ConfigError, match=r"n_classes=0; expected an integer >= 1"):
        build_model(ModelConfig(), 8, 0)
    with pytest.raises(ConfigError, match=r"init='he2' is not a known initialisation"):
        initialize_(nn.Linear(2, 2), "he2")


def test_init_names_cover_the_issue():
    assert set(INIT_NAMES) == {"default", "standard", "xavier", "he", "orthogonal", "scaled"}


# --- describe --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "label"),
    [
        pytest.param(ModelConfig(activation="sigmoid", depth=20), "sigmoid depth 20, default init",
                     id="seed-baseline"),
        pytest.param(ModelConfig(activation="relu", depth=20, init="he", batch_norm=True,
                                 residual=True),
                     "relu depth 20, he init, batch norm, residual", id="switches"),
        pytest.param(ModelConfig(activation="leaky_relu", activation_params={"negative_slope": 0.1},
                                 depth=20, width=8),
                     "leaky_relu(0.1) depth 20 width 8, default init", id="params-width"),
        pytest.param(ModelConfig(kind="cnn", activation="tanh", depth=5, init="scaled",
                                 sigma_w2=2.0, sigma_b2=0.05),
                     "cnn tanh depth 5, scaled init (sigma_w^2=2, sigma_b^2=0.05)", id="cnn-scaled"),
    ],
)
def test_describe(config, label):
    assert describe(config) == label
