"""Mean-field theory of signal and gradient propagation in wide random networks.

A fully connected network with ``depth`` layers of ``width`` units,
``h^l = W^l phi(h^{l-1}) + b^l``, weights ``W_ij ~ N(0, sigma_w2 / fan_in)`` and
biases ``b_i ~ N(0, sigma_b2)``, becomes exactly solvable as the width grows
(Poole et al. 2016, "Exponential expressivity in deep neural networks through
transient chaos"; Schoenholz et al. 2017, "Deep information propagation"):

* **variance map**: the pre-activations of layer ``l`` are Gaussian with variance
  ``q^l = sigma_w2 * E_z[phi(sqrt(q^{l-1}) z)^2] + sigma_b2`` (``z ~ N(0, 1)``),
  starting from ``q^1 = sigma_w2 * q0 + sigma_b2`` for inputs of mean square
  ``q0``. It converges to a fixed point ``q*`` within a few layers.
* **chi_1** ``= sigma_w2 * E_z[phi'(sqrt(q*) z)^2]``: the factor by which the mean
  square of the back-propagated error ``delta^l = dL/dh^l`` grows per layer
  towards the input, ``E[(delta^l)^2] = chi_1 * E[(delta^{l+1})^2]``. Below 1
  gradients vanish (ordered phase), above 1 they explode (chaotic phase); at
  ``chi_1 = 1`` (the edge of chaos) they neither vanish nor explode. The seeds'
  "product of derivatives" in expectation.
* **depth scale** ``xi = -1 / ln(chi_1)`` (its magnitude here): ``delta^2``
  changes by a factor ``e`` every ``xi`` layers; infinite at criticality.
* **correlation depth scale** ``xi_c = -1 / ln(chi_c)`` with
  ``chi_c = sigma_w2 * E[phi'(u_1) phi'(u_2)]`` at the fixed point ``c*`` of the
  correlation map (equal to ``xi`` in the ordered phase, where ``c* = 1``).
  Schoenholz et al. find networks trainable up to about ``6 xi_c`` layers.
* ReLU: ``chi_1 = sigma_w2 / 2`` exactly, so He et al. 2015 ("Delving deep into
  rectifiers"), ``sigma_w2 = 2``, is the critical initialisation.

Expectations are computed by quadrature, not sampling, but not by one global
Gauss-Hermite rule: with 128 nodes that is off by 2e-3 (ELU), 1e-2 (softsign)
and 5e-2 (hardtanh), whose ``phi'`` has kinks, and by 1e-3 for tanh at
``q = 10``. Here: composite 8-point Gauss-Legendre panels over ``|z| <= 10``,
half a unit of ``h`` wide where ``|h| <= 16`` and growing beyond, with a panel
edge at every kink of ``phi`` (0 for the ReLU family, the bounds of hardtanh);
it agrees with adaptive integration (scipy ``quad``) to 1e-12 for q up to 1e4.

``activation`` is everywhere a registry name (``"tanh"``), an
:class:`~gradwatch.activations.Activation`, an activation module (``nn.Tanh()``),
or any elementwise callable on tensors or arrays; for a callable ``phi'`` comes
from torch autograd when the callable maps a tensor to a tensor with a graph,
else from central finite differences (step ``6e-6 * max(1, |x|)``, error ~1e-10).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor, nn

from gradwatch.activations import Activation, activation_for_module, get_activation
from gradwatch.errors import ConfigError

__all__ = [
    "ActivationLike",
    "Regime",
    "MeanFieldPrediction",
    "PhaseDiagram",
    "predict",
    "q_star",
    "variance_sequence",
    "chi1",
    "depth_scale",
    "correlation_depth_scale",
    "regime",
    "critical_sigma_w2",
    "predicted_delta_profile",
    "predicted_ratio",
    "trainable_depth_curve",
    "phase_diagram",
    "meanfield_mlp",
    "activation_name",
    "fixed_point_input",
    "check_network",
]

ActivationLike = str | Activation | nn.Module | Callable
Regime = Literal["ordered", "critical", "chaotic"]

CRITICAL_TOLERANCE = 1e-3  # |chi_1 - 1| at or below this is "critical"
TRAINABLE_DEPTH_FACTOR = 6.0  # Schoenholz et al. 2017: trainable up to ~6 xi_c layers

_Z_MAX = 10.0  # N(0, 1) holds less than 2e-23 of its mass beyond |z| = 10
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
_MAX_PANELS = 2000  # per half line, for rules with a non-zero mean
_X_FINE = 16.0  # narrow panels in x up to |x| = 16
_WIDTH = 0.5  # panel width in units of x (or of z where sd < 1)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_Q_TINY = 1e-200  # chi_1 at q* = 0 is taken as the limit q -> 0+
_Q_HUGE = 1e16  # chi_1 without a fixed point is taken as the limit q -> inf
_Q_MAX_GROWTH = 1e12  # q^l beyond 1e12 * max(1, q0, sigma_b2): the variance diverges
_MAX_ITER = 10  # plain iterations before bracketing (where the map converges slowly)
_RTOL = 1e-13


# --- activations ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Act:
    """An activation as numpy functions, with its kinks and how phi' is obtained."""

    name: str
    phi: Callable[[np.ndarray], np.ndarray]
    dphi: Callable[[np.ndarray], np.ndarray]
    kinks: tuple[float, ...]
    derivative: str  # "exact" | "autograd" | "finite differences"
    make_module: Callable[[], nn.Module]


def _on_arrays(fn: Callable[[Tensor], Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    def call(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fn(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return call


def _from_registry(act: Activation) -> _Act:
    bounds = [float(v) for k, v in act.params.items() if k in ("min_val", "max_val")]
    return _Act(
        act.name, _on_arrays(act.phi), _on_arrays(act.derivative),
        tuple(sorted({0.0, *bounds})), "exact", act.make_module,
    )


class _Elementwise(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _from_callable(fn: Callable, name: str) -> _Act:
    probe = np.linspace(-3.0, 3.0, 13)
    try:
        out = fn(torch.from_numpy(probe).requires_grad_(True))
    except Exception:  # noqa: BLE001 - not a torch function; try numpy below
        out = None
    if isinstance(out, Tensor):
        phi = _on_arrays(fn)
        derivative = "autograd" if out.requires_grad else "finite differences"
    else:
        def phi(x: np.ndarray) -> np.ndarray:
            return np.asarray(fn(x), dtype=np.float64)

        derivative = "finite differences"
    try:
        values = phi(probe)
    except Exception as err:  # noqa: BLE001 - any failure means it is not usable
        raise ConfigError(
            f"activation {name!r} failed on a float64 array: {type(err).__name__}: {err}; expected "
            f"an elementwise function of a torch tensor or a numpy array, e.g. torch.tanh"
        ) from err
    if values.shape != probe.shape or not np.all(np.isfinite(values)):
        raise ConfigError(
            f"activation {name!r} mapped 13 numbers in [-3, 3] to shape {values.shape} "
            f"(finite: {bool(np.all(np.isfinite(values)))}); expected an elementwise function "
            f"returning finite values of the same shape"
        )
    if derivative == "autograd":
        def dphi(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(fn(t).sum(), t)
            return grad.numpy()
    else:
        def dphi(x: np.ndarray) -> np.ndarray:
            step = 6e-6 * np.maximum(1.0, np.abs(x))
            return (phi(x + step) - phi(x - step)) / (2.0 * step)

    def make_module() -> nn.Module:
        return fn if isinstance(fn, nn.Module) else _Elementwise(fn)

    return _Act(name, phi, dphi, (0.0,), derivative, make_module)


def _resolve(activation: ActivationLike) -> _Act:
    if isinstance(activation, str):
        return _from_registry(get_activation(activation))
    if isinstance(activation, Activation):
        return _from_registry(activation)
    if isinstance(activation, nn.Module):
        known = activation_for_module(activation)
        if known is not None:
            return _from_registry(known)
    if callable(activation):
        name = getattr(activation, "__name__", type(activation).__name__)
        return _from_callable(activation, name)
    raise ConfigError(
        f"activation={activation!r} ({type(activation).__name__}); expected a registry name "
        f"(see gradwatch.activation_names()), an Activation, an nn.Module or an elementwise callable"
    )


# --- validation -------------------------------------------------------------------------


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)


def _check_sigmas(sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    if not (_is_number(sigma_w2) and math.isfinite(sigma_w2) and sigma_w2 > 0):
        raise ConfigError(
            f"sigma_w2={sigma_w2!r}; expected a finite number > 0 (weights ~ N(0, sigma_w2 / "
            f"fan_in)): 1 is LeCun's init, 2 He's; critical_sigma_w2() gives the edge of chaos"
        )
    if not (_is_number(sigma_b2) and math.isfinite(sigma_b2) and sigma_b2 >= 0):
        raise ConfigError(
            f"sigma_b2={sigma_b2!r}; expected a finite number >= 0 (biases ~ N(0, sigma_b2)); "
            f"use 0 for zero biases"
        )
    return float(sigma_w2), float(sigma_b2)


def _check_depth(depth: int) -> int:
    if not (isinstance(depth, (int, np.integer)) and not isinstance(depth, bool) and depth >= 1):
        raise ConfigError(
            f"depth={depth!r}; expected an integer >= 1 (the number of weight layers), e.g. 50"
        )
    return int(depth)


# --- quadrature -------------------------------------------------------------------------


def _layout(sd: float) -> tuple[int, int]:
    """``(halvings, refinements)`` of the graded panels for a standard deviation ``sd``.

    Narrow panels cover ``|z| <= 10 / 2**halvings``, at least ``|x| <= 16`` (where
    activations have their features), ``20 * 2**refinements`` of them per side, at
    most half a unit of ``x`` (or of ``z``) wide. Powers of two make the layouts few,
    so their rules are cached.
    """
    if sd <= 0:
        return 0, 0
    halvings = max(0, math.floor(math.log2(_Z_MAX * sd / _X_FINE)))
    needed = (_Z_MAX / 2**halvings) * max(sd, 1.0) / _WIDTH  # panels per side
    return halvings, max(0, math.ceil(math.log2(needed / 20.0 - 1e-9)))


@functools.lru_cache(maxsize=128)
def _graded_edges(halvings: int, refinements: int) -> np.ndarray:
    """Panel edges in ``z`` on ``[-10, 10]``: even inside the fine region, then 1.5-fold wider."""
    fine = _Z_MAX / 2**halvings
    half = list(np.linspace(0.0, fine, 20 * 2**refinements + 1))
    while half[-1] < _Z_MAX:
        half.append(min(_Z_MAX, half[-1] * 1.5, half[-1] + _WIDTH))
    positive = np.array(half)
    return np.concatenate([-positive[:0:-1], positive])


def _panels(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-point Gauss-Legendre nodes ``z`` and N(0, 1) weights on each row's panels."""
    lo, hi = edges[:, :-1, None], edges[:, 1:, None]
    half = (hi - lo) / 2.0
    z = lo + half + half * _GL_NODES
    w = half * _GL_WEIGHTS * np.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return z.reshape(edges.shape[0], -1), w.reshape(edges.shape[0], -1)


@functools.lru_cache(maxsize=128)
def _standard_rule(halvings: int, refinements: int) -> tuple[np.ndarray, np.ndarray]:
    z, w = _panels(_graded_edges(halvings, refinements)[None, :])
    return z[0], w[0]


def _gaussian_rule(
    mean: np.ndarray, sd: float, kinks: Sequence[float], width: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``x`` and weights ``w`` (one row per mean) with ``sum(w * f(x)) = E_{N(mean, sd^2)} f``.

    Composite 8-point Gauss-Legendre in ``z = (x - mean) / sd`` with a panel edge at
    each kink, so that piecewise smooth integrands converge as fast as smooth ones.
    Graded panels (:func:`_layout`) for mean 0, else even ones ``width`` units of
    ``x`` wide (Default: 0.5; 1.0 is accurate to about 1e-10 and 4x cheaper in 2-D).
    """
    mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))[:, None]
    if not mean.any() and width is None:
        base = _graded_edges(*_layout(sd))
    else:
        per_side = min(_MAX_PANELS, math.ceil(_Z_MAX * max(sd, 1.0) / (width or _WIDTH)))
        base = np.linspace(-_Z_MAX, _Z_MAX, 2 * per_side + 1)
    edges = np.broadcast_to(base, (mean.shape[0], base.size))
    if sd > 0:
        cuts = np.clip((np.asarray(kinks, dtype=np.float64)[None, :] - mean) / sd, -_Z_MAX, _Z_MAX)
        edges = np.sort(np.concatenate([edges, cuts], axis=1), axis=1)
    z, w = _panels(edges)
    return mean + sd * z, w


def _expect(f: Callable[[np.ndarray], np.ndarray], q: float, kinks: Sequence[float]) -> float:
    """``E_z[f(sqrt(q) z)]`` for ``z ~ N(0, 1)``."""
    sd = math.sqrt(q)
    if all(k == 0.0 for k in kinks):  # 0 is an edge of the cached standard rule
        z, w = _standard_rule(*_layout(sd))
        return float(np.dot(w, f(sd * z)))
    x, w = _gaussian_rule(np.zeros(1), sd, kinks)
    return float(np.sum(w * f(x)))


def _mean_sq(act: _Act, q: float) -> float:
    return _expect(lambda x: np.square(act.phi(x)), q, act.kinks)


def _chi1_at(act: _Act, sigma_w2: float, q: float) -> float:
    return sigma_w2 * _expect(lambda x: np.square(act.dphi(x)), max(q, _Q_TINY), act.kinks)


# --- the variance map -------------------------------------------------------------------


def _fixed_point(act: _Act, sigma_w2: float, sigma_b2: float, q0: float) -> float:
    """``q*`` reached from ``q0`` by the variance map; ``math.inf`` if ``q^l`` diverges.

    Iterates the map a few times (it converges geometrically for the usual
    activations, but slowly near marginal stability), then brackets the root of
    ``F(q) - q`` in the direction the iterates move and solves it with Brent's method.
    """
    limit = _Q_MAX_GROWTH * max(1.0, q0, sigma_b2)

    def step(q: float) -> float:
        return sigma_w2 * _mean_sq(act, q) + sigma_b2

    q, prev = q0, q0
    for _ in range(_MAX_ITER):
        nxt = step(q)
        if not math.isfinite(nxt) or nxt > limit:
            return math.inf
        if abs(nxt - q) <= _RTOL * nxt:
            return nxt
        prev, q = q, nxt
    gap = step(q) - q
    if gap == 0:
        return q
    distance = max(abs(q - prev), 1e-12 * max(q, 1.0))
    while True:  # double the distance until F(q) - q changes sign (q >= sigma_b2 always)
        other = q + distance if gap > 0 else max(q - distance, sigma_b2)
        if other > limit:
            return math.inf
        if (step(other) - other) * gap <= 0:
            break
        if other == sigma_b2:
            raise ConfigError(
                f"q* of {act.name} at sigma_w2={sigma_w2}, sigma_b2={sigma_b2} did not converge: "
                f"no fixed point of the variance map between {sigma_b2} and {q:.6g}; "
                f"try another q0 or a different sigma_w2"
            )
        distance *= 2.0
    lo, hi = sorted((q, other))
    return float(brentq(lambda x: step(x) - x, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps))


def _divergence_message(act: _Act, sigma_w2: float, sigma_b2: float, q0: float) -> str:
    return (
        f"q* does not exist for {act.name} at sigma_w2={sigma_w2}, sigma_b2={sigma_b2}: from "
        f"q0={q0} the pre-activation variance q^l grows without bound with depth (the forward "
        f"signal explodes; for ReLU this happens at sigma_w2 > 2, or = 2 with sigma_b2 > 0). "
        f"Use a smaller sigma_w2, e.g. critical_sigma_w2({act.name!r}, sigma_b2)"
    )


def q_star(activation: ActivationLike, sigma_w2: float, sigma_b2: float, *, q0: float = 1.0) -> float:
    """Fixed point of the variance map ``q -> sigma_w2 * E_z[phi(sqrt(q) z)^2] + sigma_b2``.

    Poole et al. 2016 (the length map). ``q0`` is where the iteration starts; it matters only
    where several fixed points exist (ReLU at ``sigma_w2 = 2, sigma_b2 = 0`` keeps any
    ``q``; tanh at ``sigma_b2 = 0`` has the unstable ``q = 0``).

    Raises:
        ConfigError: bad ``sigma_w2``/``sigma_b2``/activation, or ``q^l`` diverges.
    """
    act = _resolve(activation)
    sigma_w2, sigma_b2 = _check_sigmas(sigma_w2, sigma_b2)
    result = _fixed_point(act, sigma_w2, sigma_b2, float(q0))
    if math.isinf(result):
        raise ConfigError(_divergence_message(act, sigma_w2, sigma_b2, float(q0)))
    return result


def variance_sequence(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float, depth: int, *, q0: float = 1.0
) -> np.ndarray:
    """``[q^1, ..., q^depth]`` for inputs of mean square ``q0``: ``q^1 = sigma_w2 q0 + sigma_b2``."""
    act = _resolve(activation)
    sigma_w2, sigma_b2 = _check_sigmas(sigma_w2, sigma_b2)
    return _variances(act, sigma_w2, sigma_b2, _check_depth(depth), float(q0))


def _variances(act: _Act, sigma_w2: float, sigma_b2: float, depth: int, q0: float) -> np.ndarray:
    qs = np.empty(depth)
    qs[0] = sigma_w2 * q0 + sigma_b2
    for layer in range(1, depth):
        qs[layer] = sigma_w2 * _mean_sq(act, qs[layer - 1]) + sigma_b2
        if not math.isfinite(qs[layer]) or qs[layer] > 1e300:
            raise ConfigError(
                f"the variance q^l of {act.name} at sigma_w2={sigma_w2}, sigma_b2={sigma_b2} "
                f"leaves the float range at layer {layer + 1} of {depth}; use a smaller sigma_w2"
            )
    return qs


# --- gradients: chi_1 and depth scales ----------------------------------------------------


def _chi1(act: _Act, sigma_w2: float, sigma_b2: float, q0: float) -> tuple[float, float]:
    """``(q*, chi_1)``; without a fixed point ``(inf, lim_{q -> inf} chi_1(q))``."""
    fixed = _fixed_point(act, sigma_w2, sigma_b2, q0)
    if math.isfinite(fixed):
        return fixed, _chi1_at(act, sigma_w2, fixed)
    far, farther = _chi1_at(act, sigma_w2, _Q_HUGE), _chi1_at(act, sigma_w2, 100 * _Q_HUGE)
    if not math.isclose(far, farther, rel_tol=1e-6):
        raise ConfigError(
            _divergence_message(act, sigma_w2, sigma_b2, q0)
            + f"; and chi_1 has no limit as q grows ({far:.6g} at q=1e16, {farther:.6g} at q=1e18)"
        )
    return math.inf, farther


def chi1(activation: ActivationLike, sigma_w2: float, sigma_b2: float, *, q0: float = 1.0) -> float:
    """``chi_1 = sigma_w2 * E_z[phi'(sqrt(q*) z)^2]``, the per-layer growth of ``E[delta^2]``.

    Poole et al. 2016; Schoenholz et al. 2017. ReLU: ``sigma_w2 / 2``.
    Where ``q^l`` grows without bound (ReLU at ``sigma_w2 > 2``) there is no ``q*``;
    then chi_1 is its limit as ``q -> inf``, the growth of ``delta^2`` per layer deep
    in such a network (``sigma_w2 / 2`` again for ReLU), and :func:`predict` reports
    ``q_star = inf``. If that limit does not exist either, ConfigError says so.
    """
    act = _resolve(activation)
    sigma_w2, sigma_b2 = _check_sigmas(sigma_w2, sigma_b2)
    return _chi1(act, sigma_w2, sigma_b2, float(q0))[1]


def _scale(factor: float) -> float:
    if factor <= 0:
        return 0.0
    log = math.log(factor)
    return math.inf if abs(log) < 1e-12 else 1.0 / abs(log)  # 1e-12: quadrature rounding


def depth_scale(activation: ActivationLike, sigma_w2: float, sigma_b2: float) -> float:
    """Gradient depth scale ``xi = 1 / |ln chi_1|``: ``delta^2`` changes e-fold every ``xi`` layers.

    Schoenholz et al. 2017 (``xi_grad = -1 / ln chi_1``, negative when gradients
    explode; the sign is the :func:`regime`). Infinite at criticality.
    """
    return _scale(chi1(activation, sigma_w2, sigma_b2))


def _classify(chi: float, tol: float = CRITICAL_TOLERANCE) -> Regime:
    if abs(chi - 1.0) <= tol:
        return "critical"
    return "ordered" if chi < 1.0 else "chaotic"


def regime(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float, *, tol: float = CRITICAL_TOLERANCE
) -> Regime:
    """``'ordered'`` (chi_1 < 1: gradients vanish), ``'critical'`` or ``'chaotic'`` (they explode).

    Critical means ``|chi_1 - 1| <= tol`` (Default: 1e-3, a depth scale of 1000 layers).
    """
    return _classify(chi1(activation, sigma_w2, sigma_b2), tol)


def _correlation_scale(act: _Act, sigma_w2: float, sigma_b2: float, q: float, chi: float) -> float:
    """``xi_c`` at the fixed point of the correlation map (Schoenholz et al. 2017).

    ``c -> (sigma_w2 E[phi(u_1) phi(u_2)] + sigma_b2) / q*`` with ``u_1 = sqrt(q*) z_1``,
    ``u_2 = sqrt(q*) (c z_1 + sqrt(1 - c^2) z_2)``. In the ordered phase ``c* = 1`` and
    ``chi_c = chi_1``; in the chaotic phase ``c* < 1`` is found by Brent's method.
    """
    if not math.isfinite(q) or chi <= 1.0:
        return _scale(chi)
    sd = math.sqrt(q)
    x1, w1 = _gaussian_rule(np.zeros(1), sd, act.kinks, width=1.0)
    x1, w1 = x1[0], w1[0]

    def pair_mean(f: Callable[[np.ndarray], np.ndarray], c: float) -> float:
        # E[f(u_1) f(u_2)]: u_2 given u_1 is N(c u_1, q (1 - c^2)); inner rule per outer node.
        x2, w2 = _gaussian_rule(c * x1, sd * math.sqrt(max(1.0 - c * c, 0.0)), act.kinks, width=1.0)
        return float(np.sum(w1 * f(x1) * np.sum(w2 * f(x2), axis=1)))

    def gap(c: float) -> float:
        return (sigma_w2 * pair_mean(act.phi, c) + sigma_b2) / q - c

    # Below c = 1 the gap is about -(chi_1 - 1)(1 - c) until c*, which lies near
    # 1 - 6 (chi_1 - 1) (tanh) or further down; look for a negative gap from there up.
    distance = min(0.5, 0.25 * (chi - 1.0))
    while gap(1.0 - distance) >= 0:
        distance /= 4.0
        if distance < 1e-9:  # numerically at the edge of chaos
            return math.inf
    top = 1.0 - distance
    c_star = brentq(gap, 0.0, top, xtol=1e-12) if gap(0.0) > 0 else 0.0
    return _scale(sigma_w2 * pair_mean(act.dphi, c_star))


def correlation_depth_scale(activation: ActivationLike, sigma_w2: float, sigma_b2: float) -> float:
    """``xi_c = -1 / ln chi_c``, the depth over which two inputs' correlation approaches ``c*``.

    Equal to :func:`depth_scale` in the ordered phase; larger in the chaotic phase
    (tanh, sigma_b2 = 0.05, sigma_w2 = 2.5: xi_c = 11.8 vs xi = 8.0). Where ``q*`` does
    not exist (ReLU, sigma_w2 > 2) the gradient depth scale is returned.
    """
    act = _resolve(activation)
    sigma_w2, sigma_b2 = _check_sigmas(sigma_w2, sigma_b2)
    q, chi = _chi1(act, sigma_w2, sigma_b2, 1.0)
    return _correlation_scale(act, sigma_w2, sigma_b2, q, chi)


def critical_sigma_w2(
    activation: ActivationLike, sigma_b2: float, *, sigma_w2_max: float = 1e4
) -> float:
    """The ``sigma_w2`` with ``chi_1 = 1`` at this ``sigma_b2``: the edge of chaos.

    Doubles or halves ``sigma_w2`` from 1 until ``chi_1 - 1`` changes sign, then
    solves with Brent's method. ReLU: 2 (He et al. 2015); tanh at ``sigma_b2 = 0``: 1.

    Raises:
        ConfigError: no crossing in ``(0, sigma_w2_max]`` (the message gives chi_1 there).
    """
    _, sigma_b2 = _check_sigmas(1.0, sigma_b2)
    return _critical(_resolve(activation), sigma_b2, sigma_w2_max)


def _critical(act: _Act, sigma_b2: float, sigma_w2_max: float) -> float:
    def excess(w2: float) -> float:
        return _chi1(act, w2, sigma_b2, 1.0)[1] - 1.0

    a = 1.0
    fa = excess(a)
    if fa == 0:
        return a
    b = a * (2.0 if fa < 0 else 0.5)
    fb = excess(b)
    while fa * fb > 0:
        if b > sigma_w2_max or b < 1e-8:
            raise ConfigError(
                f"{act.name} has no critical sigma_w2 at sigma_b2={sigma_b2}: chi_1 - 1 keeps "
                f"the sign of {fb:+.3g} up to sigma_w2={b:.3g}; expected a crossing in "
                f"(0, {sigma_w2_max:g}] (raise sigma_w2_max, or pick another activation)"
            )
        a, fa = b, fb
        b = a * (2.0 if fa < 0 else 0.5)
        fb = excess(b)
    lo, hi = sorted((a, b))
    return float(brentq(excess, lo, hi, xtol=1e-12, rtol=1e-12))


# --- predictions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanFieldPrediction:
    """What mean-field theory predicts for one initialisation.

    Attributes:
        activation: activation name.
        sigma_w2: weight variance times fan-in.
        sigma_b2: bias variance.
        q_star: fixed point of the variance map; ``inf`` where the variance diverges.
        chi1: per-layer growth factor of ``E[delta^2]`` towards the input.
        depth_scale: ``1 / |ln chi1|`` layers per e-fold of ``delta^2``.
        correlation_depth_scale: ``xi_c`` (see :func:`correlation_depth_scale`).
        regime: ``'ordered'``, ``'critical'`` or ``'chaotic'``.
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi1: float
    depth_scale: float
    correlation_depth_scale: float
    regime: Regime

    @property
    def trainable_depth(self) -> float:
        """About ``6 xi_c`` layers (Schoenholz et al. 2017): deeper is untrainable."""
        return TRAINABLE_DEPTH_FACTOR * self.correlation_depth_scale

    def ratio(self, depth: int) -> float:
        """Predicted first/last delta RMS at the fixed point: ``chi1 ** ((depth - 1) / 2)``."""
        return self.chi1 ** ((_check_depth(depth) - 1) / 2.0)


def predict(activation: ActivationLike, sigma_w2: float, sigma_b2: float) -> MeanFieldPrediction:
    """All of q*, chi_1, the depth scales and the regime in one :class:`MeanFieldPrediction`."""
    return _predict(_resolve(activation), *_check_sigmas(sigma_w2, sigma_b2))


def _predict(act: _Act, sigma_w2: float, sigma_b2: float) -> MeanFieldPrediction:
    q, chi = _chi1(act, sigma_w2, sigma_b2, 1.0)
    return MeanFieldPrediction(
        activation=act.name,
        sigma_w2=sigma_w2,
        sigma_b2=sigma_b2,
        q_star=q,
        chi1=chi,
        depth_scale=_scale(chi),
        correlation_depth_scale=_correlation_scale(act, sigma_w2, sigma_b2, q, chi),
        regime=_classify(chi),
    )


def predicted_delta_profile(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    *,
    q0: float | None = None,
) -> np.ndarray:
    """Predicted ``RMS(delta^l) / RMS(delta^depth)`` for layers ``l = 1..depth`` (last is 1).

    ``E[(delta^l)^2] = sigma_w2 E[phi'(h^l)^2] E[(delta^{l+1})^2]`` (equal widths; the
    gradient-independence assumption of Schoenholz et al. 2017), so the profile is
    ``sqrt(prod_{k=l}^{depth-1} chi_1(q^k))``. With ``q0=None`` every layer sits at
    ``q*`` (``chi_1^((depth - l) / 2)``); with the inputs' mean square ``q0`` the actual
    ``q^l`` sequence is used, so shallow layers before convergence are right too.
    """
    act = _resolve(activation)
    sigma_w2, sigma_b2 = _check_sigmas(sigma_w2, sigma_b2)
    depth = _check_depth(depth)
    if q0 is None:
        factors = np.full(depth - 1, _chi1(act, sigma_w2, sigma_b2, 1.0)[1])
    else:
        qs = _variances(act, sigma_w2, sigma_b2, depth, float(q0))
        factors = np.array([_chi1_at(act, sigma_w2, q) for q in qs[:-1]])
    with np.errstate(divide="ignore", over="ignore"):
        logs = np.log(factors)
    # log profile[l] = 0.5 * sum of log chi_1 over layers l .. depth-1 (in log space: no overflow)
    tail = np.concatenate([np.cumsum(logs[::-1])[::-1], [0.0]])
    with np.errstate(over="ignore"):
        return np.exp(0.5 * tail)


def predicted_ratio(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    *,
    q0: float | None = None,
) -> float:
    """Predicted first/last delta RMS: ``predicted_delta_profile(...)[0]``."""
    return float(predicted_delta_profile(activation, sigma_w2, sigma_b2, depth, q0=q0)[0])


def trainable_depth_curve(
    activation: ActivationLike, sigma_w2_values: Sequence[float], sigma_b2: float
) -> np.ndarray:
    """``6 xi_c`` for each ``sigma_w2``: the curve Schoenholz et al. 2017 draw over accuracy."""
    act = _resolve(activation)
    return np.array(
        [_predict(act, *_check_sigmas(w2, sigma_b2)).trainable_depth for w2 in sigma_w2_values]
    )


class PhaseDiagram(NamedTuple):
    """chi_1 over a (sigma_w2, sigma_b2) grid and the chi_1 = 1 line, ready to draw."""

    sigma_w2: np.ndarray  # (W,)
    sigma_b2: np.ndarray  # (B,)
    chi1: np.ndarray  # (B, W)
    critical_sigma_w2: np.ndarray  # (B,), nan where no crossing below sigma_w2_max


def phase_diagram(
    activation: ActivationLike,
    sigma_w2_values: Sequence[float],
    sigma_b2_values: Sequence[float],
    *,
    sigma_w2_max: float = 1e4,
) -> PhaseDiagram:
    """The ordered/chaotic phase diagram in the (sigma_w2, sigma_b2) plane (Schoenholz et al. 2017)."""
    act = _resolve(activation)
    w2s = np.asarray(sigma_w2_values, dtype=np.float64)
    b2s = np.asarray(sigma_b2_values, dtype=np.float64)
    grid = np.empty((len(b2s), len(w2s)))
    line = np.full(len(b2s), np.nan)
    for i, b2 in enumerate(b2s):
        for j, w2 in enumerate(w2s):
            grid[i, j] = _chi1(act, *_check_sigmas(float(w2), float(b2)), 1.0)[1]
        try:
            line[i] = _critical(act, _check_sigmas(1.0, float(b2))[1], sigma_w2_max)
        except ConfigError:
            pass
    return PhaseDiagram(w2s, b2s, grid, line)


# --- the networks the theory describes -------------------------------------------------------


def meanfield_mlp(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """``depth`` blocks ``fc{l}: Linear(width, width)``, ``act{l}``, initialised as the theory assumes.

    Weights ``N(0, sigma_w2 / fan_in)``, biases ``N(0, sigma_b2)``.
    """
    sigma_w2, sigma_b2 = _check_sigmas(sigma_w2, sigma_b2)
    if not (isinstance(width, int) and not isinstance(width, bool) and width >= 1):
        raise ConfigError(f"width={width!r}; expected an integer >= 1, e.g. 512")
    return _mlp(_resolve(activation), sigma_w2, sigma_b2, _check_depth(depth), width, generator)


def _mlp(
    act: _Act, sigma_w2: float, sigma_b2: float, depth: int, width: int, generator: torch.Generator | None
) -> nn.Sequential:
    blocks: list[tuple[str, nn.Module]] = []
    for layer in range(1, depth + 1):
        linear = torch.nn.utils.skip_init(nn.Linear, width, width)  # drawn below, not twice
        with torch.no_grad():
            linear.weight.normal_(0.0, math.sqrt(sigma_w2 / width), generator=generator)
            linear.bias.normal_(0.0, math.sqrt(sigma_b2), generator=generator)
        blocks += [(f"fc{layer}", linear), (f"act{layer}", act.make_module())]
    return nn.Sequential(OrderedDict(blocks))


def activation_name(activation: ActivationLike) -> str:
    """The name the theory's results carry for ``activation`` (its registry name, else the
    callable's ``__name__``).

    Raises:
        ConfigError: ``activation`` is none of a registry name, an Activation, a module or an
            elementwise callable (the message says which it was).
    """
    return _resolve(activation).name


def check_network(sigma_w2: float, sigma_b2: float, depth: int) -> tuple[float, float, int]:
    """``(sigma_w2, sigma_b2, depth)`` as floats and an int, checked as every function here checks them.

    Raises:
        ConfigError: ``sigma_w2 <= 0``, ``sigma_b2 < 0``, either not finite, or ``depth < 1``.
    """
    sigma_w2, sigma_b2 = _check_sigmas(sigma_w2, sigma_b2)
    return sigma_w2, sigma_b2, _check_depth(depth)


def fixed_point_input(activation: ActivationLike, sigma_w2: float, sigma_b2: float) -> float:
    """The mean square ``q0`` of inputs that start every layer at the fixed point.

    ``q^1 = sigma_w2 q0 + sigma_b2 = q*``, so ``q0 = (q* - sigma_b2) / sigma_w2``
    ``= E[phi(sqrt(q*) z)^2]``. Where ``q*`` is 0 (ReLU at ``sigma_b2 = 0``: zero inputs
    would carry no gradient) or infinite (the variance diverges), 1.
    """
    act = _resolve(activation)
    sigma_w2, sigma_b2 = _check_sigmas(sigma_w2, sigma_b2)
    fixed = _fixed_point(act, sigma_w2, sigma_b2, 1.0)
    return (fixed - sigma_b2) / sigma_w2 if math.isfinite(fixed) and fixed > 1e-12 else 1.0
