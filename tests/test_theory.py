import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from torch import nn
from typer.testing import CliRunner

from gradwatch import get_activation, open_store, theory
from gradwatch.cli import app
from gradwatch.errors import ConfigError
from gradwatch.lab.meanfield import measure_delta_profile


@pytest.fixture(autouse=True)
def one_thread():
    # The quadrature calls phi on a few hundred float64 numbers; after an explicit
    # torch.set_num_threads(2) (conftest) MKL's float64 tanh takes 5 ms instead of 8 us
    # per call on a busy two-core machine. One thread is also fastest for width 512.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a reference implementation: adaptive quadrature (scipy.quad) and plain iteration ---

_REFERENCE = {
    "tanh": (np.tanh, lambda x: 1 / np.cosh(x) ** 2, ()),
    "sigmoid": (
        lambda x: 1 / (1 + np.exp(-x)),
        lambda x: np.exp(-x) / (1 + np.exp(-x)) ** 2,
        (),
    ),
    "elu": (
        lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
        lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0))),
        (0.0,),
    ),
    "softsign": (lambda x: x / (1 + abs(x)), lambda x: 1 / (1 + abs(x)) ** 2, (0.0,)),
    "hardtanh": (lambda x: np.clip(x, -1, 1), lambda x: float(abs(x) < 1), (-1.0, 1.0)),
}


def _ref_expect(f, q, kinks):
    s = math.sqrt(q)
    points = sorted([-12.0, 12.0, 0.0, *[k / s for k in kinks if abs(k / s) < 12]])
    return sum(
        quad(lambda z: f(s * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi), a, b,
             epsabs=1e-14, epsrel=1e-13, limit=200)[0]
        for a, b in zip(points[:-1], points[1:], strict=True)
    )


def _ref_q_chi1(name, sigma_w2, sigma_b2):
    phi, dphi, kinks = _REFERENCE[name]
    q, previous = 1.0, math.inf
    while abs(q - previous) > 1e-14 * q:
        q, previous = sigma_w2 * _ref_expect(lambda x: phi(x) ** 2, q, kinks) + sigma_b2, q
    return q, sigma_w2 * _ref_expect(lambda x: dphi(x) ** 2, q, kinks)


@pytest.mark.parametrize(
    "name, sigma_w2, sigma_b2",
    [
        pytest.param("tanh", 1.5, 0.05, id="tanh"),
        pytest.param("tanh", 9.0, 0.3, id="tanh-large-q"),
        pytest.param("sigmoid", 3.0, 0.0, id="sigmoid"),
        pytest.param("elu", 1.2, 0.1, id="elu-kink"),
        pytest.param("softsign", 2.0, 0.05, id="softsign-kink"),
        pytest.param("hardtanh", 1.5, 0.05, id="hardtanh-two-kinks"),
    ],
)
def test_q_star_and_chi1_match_adaptive_quadrature(name, sigma_w2, sigma_b2):
    q_ref, chi_ref = _ref_q_chi1(name, sigma_w2, sigma_b2)
    assert theory.q_star(name, sigma_w2, sigma_b2) == pytest.approx(q_ref, rel=1e-9)
    assert theory.chi1(name, sigma_w2, sigma_b2) == pytest.approx(chi_ref, rel=1e-9)


# --- published values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigma_w2, q_star, chi1",
    [pytest.param(1.5, 0.418, 0.939, id="ordered"), pytest.param(2.5, 1.064, 1.134, id="chaotic")],
)
def test_tanh_published_values(sigma_w2, q_star, chi1):
    prediction = theory.predict("tanh", sigma_w2, 0.05)
    assert round(prediction.q_star, 3) == q_star  # to the digits published
    assert round(prediction.chi1, 3) == chi1
    assert prediction.regime == ("ordered" if chi1 < 1 else "chaotic")


@pytest.mark.parametrize("sigma_b2", [0.0, 0.05])
@pytest.mark.parametrize("sigma_w2", [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
def test_relu_chi1_is_half_sigma_w2(sigma_w2, sigma_b2):
    assert theory.chi1("relu", sigma_w2, sigma_b2) == pytest.approx(sigma_w2 / 2, abs=1e-6)


@pytest.mark.parametrize("sigma_w2", [0.5, 1.0, 1.9])
def test_relu_q_star_closed_form(sigma_w2):
    # q = sigma_w2 * q / 2 + sigma_b2  =>  q* = sigma_b2 / (1 - sigma_w2 / 2)
    assert theory.q_star("relu", sigma_w2, 0.1) == pytest.approx(0.1 / (1 - sigma_w2 / 2), rel=1e-9)


def test_relu_beyond_he_init_has_no_fixed_point_but_a_chi1():
    prediction = theory.predict("relu", 3.0, 0.0)
    assert prediction.q_star == math.inf
    assert prediction.chi1 == pytest.approx(1.5, abs=1e-12)
    assert prediction.regime == "chaotic"
    with pytest.raises(ConfigError, match=r"q\* does not exist for relu at sigma_w2=3.0.*grows without"):
        theory.q_star("relu", 3.0, 0.0)


def test_sigmoid_stays_ordered_for_common_inits():
    for sigma_w2 in np.linspace(0.01, 4.0, 60):
        assert theory.chi1("sigmoid", sigma_w2, 0.0) < 1.0
    assert theory.regime("sigmoid", 4.0, 0.0) == "ordered"
    assert theory.critical_sigma_w2("sigmoid", 0.0) > 100  # the edge of chaos is far away


def test_critical_sigma_w2():
    assert theory.critical_sigma_w2("relu", 0.0) == pytest.approx(2.0, abs=1e-9)
    assert theory.critical_sigma_w2("relu", 0.05) == pytest.approx(2.0, abs=1e-9)
    assert theory.critical_sigma_w2("tanh", 0.0) == pytest.approx(1.0, abs=1e-9)
    critical = theory.critical_sigma_w2("tanh", 0.05)
    assert 1.5 < critical < 2.0
    assert theory.chi1("tanh", critical, 0.05) == pytest.approx(1.0, abs=1e-9)
    assert theory.regime("tanh", critical, 0.05) == "critical"
    assert theory.depth_scale("relu", 2.0, 0.0) == math.inf


def test_tanh_at_zero_bias_converges_to_zero_variance():
    assert theory.q_star("tanh", 0.8, 0.0) == 0.0
    assert theory.chi1("tanh", 0.8, 0.0) == pytest.approx(0.8)  # phi'(0)^2 = 1
    assert theory.chi1("tanh", 1.0, 0.0) == pytest.approx(1.0)  # slow, power-law convergence


def test_depth_scales():
    ordered = theory.predict("tanh", 1.5, 0.05)
    assert ordered.depth_scale == pytest.approx(-1 / math.log(ordered.chi1))
    assert ordered.correlation_depth_scale == pytest.approx(ordered.depth_scale)
    assert ordered.trainable_depth == pytest.approx(6 * ordered.depth_scale)
    chaotic = theory.predict("tanh", 2.5, 0.05)
    assert chaotic.depth_scale == pytest.approx(1 / math.log(chaotic.chi1))
    # Schoenholz et al.: in the chaotic phase xi_c (correlations, c* < 1) exceeds xi_grad
    assert chaotic.correlation_depth_scale == pytest.approx(11.80, abs=0.01)
    assert theory.correlation_depth_scale("tanh", 2.5, 0.05) == chaotic.correlation_depth_scale
    curve = theory.trainable_depth_curve("tanh", [1.0, 1.5, 1.76, 2.5], 0.05)
    assert curve.shape == (4,)
    assert curve[2] == curve.max() and curve[2] > 300  # peaks at the edge of chaos


# --- activations as names, objects, modules and callables -----------------------------


def test_activation_forms_agree():
    expected = theory.chi1("tanh", 1.5, 0.05)
    assert theory.chi1(get_activation("tanh"), 1.5, 0.05) == expected
    assert theory.chi1(nn.Tanh(), 1.5, 0.05) == expected
    assert theory.chi1(torch.tanh, 1.5, 0.05) == pytest.approx(expected, rel=1e-12)  # autograd
    assert theory.chi1(np.tanh, 1.5, 0.05) == pytest.approx(expected, rel=1e-8)  # finite diff.
    leaky = get_activation("leaky_relu", negative_slope=0.2)
    assert theory.chi1(leaky, 1.0, 0.0) == pytest.approx((1 + 0.2**2) / 2, abs=1e-12)


# --- predicted profile ---------------------------------------------------------------------


def test_predicted_profile_at_the_fixed_point():
    chi = theory.chi1("tanh", 1.5, 0.05)
    profile = theory.predicted_delta_profile("tanh", 1.5, 0.05, 10)
    assert profile.shape == (10,)
    assert profile[-1] == 1.0
    np.testing.assert_allclose(profile, chi ** ((9 - np.arange(10)) / 2), rtol=1e-12)
    assert theory.predicted_ratio("tanh", 1.5, 0.05, 10) == pytest.approx(chi**4.5)
    assert theory.predict("tanh", 1.5, 0.05).ratio(10) == pytest.approx(chi**4.5)
    assert theory.predicted_ratio("relu", 3.0, 0.0, 5000) == math.inf  # no overflow error


def test_predicted_profile_from_an_input_variance():
    q = theory.q_star("tanh", 1.5, 0.05)
    at_fixed_point = (q - 0.05) / 1.5  # inputs with q^1 = q*
    np.testing.assert_allclose(
        theory.predicted_delta_profile("tanh", 1.5, 0.05, 8, q0=at_fixed_point),
        theory.predicted_delta_profile("tanh", 1.5, 0.05, 8),
        rtol=1e-9,
    )
    qs = theory.variance_sequence("tanh", 1.5, 0.05, 60, q0=3.0)
    assert qs[0] == pytest.approx(1.5 * 3.0 + 0.05)
    assert qs[-1] == pytest.approx(q, rel=1e-3)
    # large inputs saturate the first layers: their phi' is smaller, so the ratio is smaller
    assert theory.predicted_ratio("tanh", 1.5, 0.05, 8, q0=3.0) < theory.predicted_ratio(
        "tanh", 1.5, 0.05, 8
    )


def test_phase_diagram():
    diagram = theory.phase_diagram("relu", [1.0, 2.0, 3.0], [0.0, 0.1])
    np.testing.assert_allclose(diagram.chi1, [[0.5, 1.0, 1.5]] * 2, atol=1e-12)
    np.testing.assert_allclose(diagram.critical_sigma_w2, [2.0, 2.0], atol=1e-9)


# --- measured vs predicted -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, sigma_w2, sigma_b2",
    [
        pytest.param("tanh", 1.0, 0.05, id="tanh-1.0"),
        pytest.param("tanh", 1.5, 0.05, id="tanh-1.5"),
        pytest.param("tanh", 2.0, 0.05, id="tanh-2.0"),
        pytest.param("tanh", 2.5, 0.05, id="tanh-2.5"),
        pytest.param("relu", 2.0, 0.0, id="relu-he"),
    ],
)
def test_measured_chi1_within_ten_percent(name, sigma_w2, sigma_b2):
    measured = measure_delta_profile(name, sigma_w2, sigma_b2, 20, width=512, seeds=3, batch=32)
    predicted = theory.chi1(name, sigma_w2, sigma_b2)
    assert measured.delta_rms.shape == (3, 20)
    assert measured.chi1 == pytest.approx(predicted, rel=0.10)


def test_measurement_is_recorded_by_watch(tmp_path):
    store = tmp_path / "runs.db"
    measured = measure_delta_profile("tanh", 1.5, 0.05, 6, width=64, seeds=2, batch=8,
                                            store=store)
    with open_store(store) as runs:
        assert len(runs.runs()) == 2
        metrics = runs.metrics(measured.run_ids[1], metrics=["delta_rms"])
        first = metrics[metrics["layer"] == "fc1"]["delta_rms"].item()
    assert first == pytest.approx(measured.delta_rms[1, 0], rel=1e-6)
    assert measured.profile[-1] == 1.0
    assert list(measured.middle_layers) == [1, 2, 3]


def test_measured_profile_follows_the_input_variance():
    measured = measure_delta_profile("tanh", 1.5, 0.05, 8, width=256, seeds=2, batch=32,
                                            q0=3.0)
    predicted = theory.predicted_delta_profile("tanh", 1.5, 0.05, 8, q0=3.0)
    np.testing.assert_allclose(measured.profile, predicted, rtol=0.1)


def test_meanfield_mlp_initialisation():
    model = theory.meanfield_mlp("tanh", 2.0, 0.5, 3, 400, generator=torch.Generator().manual_seed(0))
    assert [name for name, _ in model.named_children()] == ["fc1", "act1", "fc2", "act2", "fc3", "act3"]
    assert model.fc2.weight.var().item() == pytest.approx(2.0 / 400, rel=0.02)
    assert model.fc2.bias.var().item() == pytest.approx(0.5, rel=0.25)
    assert isinstance(model.act1, nn.Tanh)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_w2", [0.0, -1.0, float("nan"), float("inf"), "2"])
def test_bad_sigma_w2(sigma_w2):
    expected = r"sigma_w2=.*; expected a finite number > 0 .*N\(0, sigma_w2 / fan_in\)"
    with pytest.raises(ConfigError, match=expected):
        theory.chi1("tanh", sigma_w2, 0.05)


@pytest.mark.parametrize("sigma_b2", [-0.1, float("nan")])
def test_bad_sigma_b2(sigma_b2):
    expected = r"sigma_b2=.*; expected a finite number >= 0 .*use 0 for zero biases"
    with pytest.raises(ConfigError, match=expected):
        theory.q_star("tanh", 1.0, sigma_b2)
    with pytest.raises(ConfigError, match=r"sigma_b2=-0.1"):
        theory.critical_sigma_w2("tanh", -0.1)


def test_unknown_activation_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown activation 'swoosh'; known: .*relu.*sigmoid.*tanh"):
        theory.predict("swoosh", 1.0, 0.0)


@pytest.mark.parametrize("depth", [0, -3, 2.5, True])
def test_bad_depth(depth):
    expected = r"depth=.*; expected an integer >= 1 \(the number of weight layers\)"
    with pytest.raises(ConfigError, match=expected):
        theory.predicted_delta_profile("tanh", 1.0, 0.0, depth)


def test_diverging_variance_says_so():
    expected = r"q\* does not exist for relu at sigma_w2=2.0, sigma_b2=0.05.*grows without bound"
    with pytest.raises(ConfigError, match=expected):
        theory.q_star("relu", 2.0, 0.05)
    with pytest.raises(ConfigError, match=r"grows without bound.*chi_1 has no limit as q grows"):
        theory.chi1(lambda x: x * x, 1.0, 0.0)
    with pytest.raises(ConfigError, match=r"leaves the float range at layer"):
        theory.variance_sequence("relu", 4.0, 0.0, 3000)


def test_bad_activation_objects():
    with pytest.raises(ConfigError, match=r"activation=42 \(int\); expected a registry name"):
        theory.chi1(42, 1.0, 0.0)
    with pytest.raises(ConfigError, match=r"activation '_total' mapped 13 numbers .* to shape \(\)"):
        theory.chi1(_total, 1.0, 0.0)


def _total(x):
    return x.sum()


def test_no_critical_point_says_so():
    expected = r"sigmoid has no critical sigma_w2 at sigma_b2=0.0.*raise sigma_w2_max"
    with pytest.raises(ConfigError, match=expected):
        theory.critical_sigma_w2("sigmoid", 0.0, sigma_w2_max=50)


def test_bad_measurement_arguments():
    with pytest.raises(ConfigError, match=r"seeds=0; expected an integer >= 1"):
        measure_delta_profile("tanh", 1.0, 0.0, 5, seeds=0)
    with pytest.raises(ConfigError, match=r"width=0; expected an integer >= 1"):
        theory.meanfield_mlp("tanh", 1.0, 0.0, 5, 0)


# --- the command line ----------------------------------------------------------------------

runner = CliRunner()
WIDE = {"COLUMNS": "160"}


def test_cli_prints_the_prediction():
    args = ["theory", "--activation", "tanh", "--sigma-w2", "1.5", "--sigma-b2", "0.05", "--depth", "50"]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    for text in ("q*", "0.418", "0.9386", "15.8", "ordered", "0.212", "1.761", "E[delta^2]"):
        assert text in result.output


def test_cli_measures_and_plots(tmp_path):
    out = tmp_path / "phase.png"
    args = ["theory", "-a", "relu", "--sigma-w2", "2", "--depth", "6", "--measure", "--width", "128",
            "--seeds", "2", "--batch", "16", "--plot", str(out)]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert "measured / predicted" in result.output and "fc6" in result.output
    assert "chi_1 measured:" in result.output and "vs predicted 1" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--sigma-w2", "0"], "error: sigma_w2=0.0; expected a finite number > 0", id="sigma-w2"),
        pytest.param(["--sigma-b2", "-1"], "error: sigma_b2=-1.0; expected a finite number", id="sigma-b2"),
        pytest.param(["-a", "swoosh"], "unknown activation 'swoosh'; known: elu, gelu", id="activation"),
        pytest.param(["--depth", "0"], "error: depth=0; expected an integer >= 1", id="depth"),
        pytest.param(["--plot", "/no/such/dir/x.png"], "error: cannot write the plot to", id="plot"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = runner.invoke(app, ["theory", *args], env=WIDE)
    assert result.exit_code == 1
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_fixed_point_input_starts_the_first_layer_at_the_fixed_point():
    q0 = theory.fixed_point_input("tanh", 1.5, 0.05)
    assert 1.5 * q0 + 0.05 == pytest.approx(theory.q_star("tanh", 1.5, 0.05), rel=1e-12)
    assert theory.variance_sequence("tanh", 1.5, 0.05, 3, q0=q0) == pytest.approx(
        [theory.q_star("tanh", 1.5, 0.05)] * 3, rel=1e-9)
    assert theory.fixed_point_input("relu", 1.0, 0.0) == 1.0  # q* = 0: no signal to start from
    with pytest.raises(ConfigError, match=r"sigma_w2=0; expected a finite number > 0"):
        theory.fixed_point_input("tanh", 0, 0.0)
    with pytest.raises(ConfigError, match=r"depth=0; expected an integer >= 1"):
        theory.check_network(1.0, 0.0, 0)
    assert theory.activation_name(nn.Tanh()) == "tanh"
