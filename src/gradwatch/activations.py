"""The activation registry: phi, phi' and the regions the seeds talk about.

For each known activation gradwatch knows the function ``phi``, its derivative
``phi'``, and the largest value ``phi'`` takes. From these follow the regions
that the watcher measures on the inputs of every activation module:

* **green region**: ``phi'(x) >= green_fraction * max phi'`` (default one half):
  where the derivative is not small, the region batch normalisation keeps the
  inputs in. For the sigmoid (``phi' = s(1 - s) <= 0.25``) it is ``|x| <= 1.763``.
* **saturated**: ``phi'(x) < saturation_fraction * max phi'`` (default 0.1) for
  activations with flat tails (sigmoid, tanh, softsign, hardtanh, ELU, GELU,
  SiLU). ReLU and LeakyReLU do not saturate in this sense; their zero side is
  measured by the dead-unit fraction instead.
* **dead unit**: a unit (feature or channel) whose derivative is zero for every
  element of the batch: it passes no gradient back (dying ReLU).

The sigmoid's bound ``max phi' = 1/4`` is why a product of ``n`` sigmoid
derivatives is at most ``4**-n``: the vanishing gradient problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradwatch.errors import ConfigError

__all__ = [
    "Activation",
    "activation_names",
    "get_activation",
    "activation_for_module",
]

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    """One elementwise activation with its derivative and regions.

    Attributes:
        name: registry name, e.g. ``"sigmoid"``.
        phi: the function, elementwise on tensors.
        derivative: ``phi'``, elementwise on tensors.
        max_derivative: ``max_x |phi'(x)|`` (0.25 for the sigmoid).
        saturating: True if ``phi'`` goes to zero in flat tails.
        make_module: builds the ``nn.Module`` with the same parameters.
        params: the parameters (negative slope, alpha, bounds) as a dict.
        peak: where, among a unit's inputs, phi' is largest where it can vanish:
            ``"max"`` (at the largest input: ReLU, LeakyReLU, ELU, GELU, SiLU, whose
            phi' vanishes only toward -inf), ``"min_abs"`` (at the input nearest 0:
            sigmoid, tanh, softsign) or None (no shortcut: compute phi' everywhere).
            It makes the dead-unit test one reduction instead of phi' on every input.
        nonnegative: True if ``phi' >= 0`` everywhere (then ``|phi'|`` is phi' itself; not
            GELU or SiLU, whose phi' dips below 0, nor a negative LeakyReLU slope or ELU alpha).
    """

    name: str
    phi: Callable[[Tensor], Tensor] = field(repr=False)
    derivative: Callable[[Tensor], Tensor] = field(repr=False)
    max_derivative: float
    saturating: bool
    make_module: Callable[[], nn.Module] = field(repr=False)
    params: dict = field(default_factory=dict)
    peak: str | None = None
    nonnegative: bool = False

    @property
    def key(self) -> tuple:
        """What tells activations apart: the name and the parameters (hashable). Calls of equal
        keys are measured together (one batch of region statistics per key).
        """
        return (self.name, tuple(sorted(self.params.items())))

    def green_threshold(self, fraction: float = 0.5) -> float:
        """Derivative value at and above which an input is in the green region."""
        return fraction * self.max_derivative

    def saturation_threshold(self, fraction: float = 0.1) -> float:
        """Derivative value below which an input counts as saturated."""
        return fraction * self.max_derivative


# --- derivatives -------------------------------------------------------------


def _d_sigmoid(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _d_tanh(x: Tensor) -> Tensor:
    t = torch.tanh(x)
    return 1 - t * t


def _d_relu(x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def _d_softsign(x: Tensor) -> Tensor:
    return (1 + x.abs()).reciprocal().square()


def _d_silu(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _d_gelu_exact(x: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(x / _SQRT2))
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * x * x)
    return cdf + x * pdf


_GELU_C = math.sqrt(2.0 / math.pi)


def _d_gelu_tanh(x: Tensor) -> Tensor:
    inner = _GELU_C * (x + 0.044715 * x**3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)


def _leaky_relu(slope: float) -> Activation:
    return Activation(
        name="leaky_relu",
        phi=lambda x: torch.nn.functional.leaky_relu(x, slope),
        derivative=lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope)),
        max_derivative=max(1.0, abs(slope)),
        saturating=False,
        make_module=lambda: nn.LeakyReLU(slope),
        params={"negative_slope": slope},
        peak="max",
        nonnegative=slope >= 0,
    )


def _elu(alpha: float) -> Activation:
    return Activation(
        name="elu",
        phi=lambda x: torch.nn.functional.elu(x, alpha),
        derivative=lambda x: torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x)),
        max_derivative=max(1.0, alpha),
        saturating=True,
        make_module=lambda: nn.ELU(alpha),
        params={"alpha": alpha},
        peak="max",
        nonnegative=alpha >= 0,
    )


def _hardtanh(min_val: float, max_val: float) -> Activation:
    return Activation(
        name="hardtanh",
        phi=lambda x: torch.nn.functional.hardtanh(x, min_val, max_val),
        derivative=lambda x: ((x > min_val) & (x < max_val)).to(x.dtype),
        max_derivative=1.0,
        saturating=True,
        make_module=lambda: nn.Hardtanh(min_val, max_val),
        params={"min_val": min_val, "max_val": max_val},
        nonnegative=True,
    )


def _gelu(approximate: str) -> Activation:
    if approximate not in ("none", "tanh"):
        raise ConfigError(f"gelu approximate={approximate!r}; expected 'none' or 'tanh'")
    deriv = _d_gelu_exact if approximate == "none" else _d_gelu_tanh
    return Activation(
        name="gelu",
        phi=lambda x: torch.nn.functional.gelu(x, approximate=approximate),
        derivative=deriv,
        max_derivative=1.1289041451,  # at x = sqrt(2): Phi(sqrt 2) + sqrt 2 * phi(sqrt 2)
        saturating=True,
        make_module=lambda: nn.GELU(approximate=approximate),
        params={"approximate": approximate},
        peak="max",
    )


_SIMPLE: dict[str, Callable[[], Activation]] = {
    "sigmoid": lambda: Activation(
        "sigmoid", torch.sigmoid, _d_sigmoid, 0.25, True, nn.Sigmoid, peak="min_abs", nonnegative=True
    ),
    "tanh": lambda: Activation(
        "tanh", torch.tanh, _d_tanh, 1.0, True, nn.Tanh, peak="min_abs", nonnegative=True
    ),
    "relu": lambda: Activation(
        "relu", torch.relu, _d_relu, 1.0, False, nn.ReLU, peak="max", nonnegative=True
    ),
    "softsign": lambda: Activation(
        "softsign", torch.nn.functional.softsign, _d_softsign, 1.0, True, nn.Softsign, peak="min_abs",
        nonnegative=True,
    ),
    # max of SiLU' is at x ~ 2.3994
    "silu": lambda: Activation(
        "silu", torch.nn.functional.silu, _d_silu, 1.0998393201, True, nn.SiLU, peak="max"
    ),
}

_PARAMETRISED: dict[str, Callable[..., Activation]] = {
    "leaky_relu": lambda negative_slope=0.01: _leaky_relu(float(negative_slope)),
    "elu": lambda alpha=1.0: _elu(float(alpha)),
    "gelu": lambda approximate="none": _gelu(approximate),
    "hardtanh": lambda min_val=-1.0, max_val=1.0: _hardtanh(float(min_val), float(max_val)),
}

_ALIASES = {"leakyrelu": "leaky_relu", "swish": "silu", "logistic": "sigmoid"}


def activation_names() -> list[str]:
    """Names of every activation in the registry, sorted."""
    return sorted([*_SIMPLE, *_PARAMETRISED])


def get_activation(name: str, **params: float | str) -> Activation:
    """The registry entry for ``name`` (e.g. ``get_activation("leaky_relu", negative_slope=0.1)``).

    Raises:
        ConfigError: unknown name (the message lists the known ones) or unknown parameter.
    """
    key = _ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    if key in _SIMPLE:
        if params:
            raise ConfigError(f"activation {name!r} takes no parameters; got {sorted(params)}")
        return _SIMPLE[key]()
    if key in _PARAMETRISED:
        try:
            return _PARAMETRISED[key](**params)
        except TypeError as err:
            raise ConfigError(f"activation {name!r}: bad parameters {params}: {err}") from err
    raise ConfigError(f"unknown activation {name!r}; known: {', '.join(activation_names())}")


# Exact module types first; transformers' activation modules are matched by class name.
_BY_TYPE: list[tuple[type, Callable[[nn.Module], Activation]]] = [
    (nn.Sigmoid, lambda m: get_activation("sigmoid")),
    (nn.Tanh, lambda m: get_activation("tanh")),
    (nn.ReLU, lambda m: get_activation("relu")),
    (nn.LeakyReLU, lambda m: get_activation("leaky_relu", negative_slope=m.negative_slope)),
    (nn.ELU, lambda m: get_activation("elu", alpha=m.alpha)),
    (nn.GELU, lambda m: get_activation("gelu", approximate=m.approximate)),
    (nn.SiLU, lambda m: get_activation("silu")),
    (nn.Softsign, lambda m: get_activation("softsign")),
    (nn.Hardtanh, lambda m: get_activation("hardtanh", min_val=m.min_val, max_val=m.max_val)),
]

_BY_CLASS_NAME = {
    "geluactivation": lambda m: get_activation("gelu"),
    "newgeluactivation": lambda m: get_activation("gelu", approximate="tanh"),
    "gelutanh": lambda m: get_activation("gelu", approximate="tanh"),
    "fastgeluactivation": lambda m: get_activation("gelu", approximate="tanh"),
    "siluactivation": lambda m: get_activation("silu"),
}


def activation_for_module(module: nn.Module) -> Activation | None:
    """The registry entry matching a module (``nn.Tanh()`` -> tanh), or None if unknown.

    ``nn.ReLU6`` matches as hardtanh(0, 6), since it is one (it subclasses Hardtanh).
    """
    for module_type, build in _BY_TYPE:
        if isinstance(module, module_type):
            return build(module)
    build_by_name = _BY_CLASS_NAME.get(type(module).__name__.lower())
    return build_by_name(module) if build_by_name else None
