"""The lab's models: configurable MLP and small CNN stacks, with the inits of the papers.

A :class:`ModelConfig` says what to build (depth, width, activation, init, batch
norm, residual); :func:`build_model` builds it for a data set's input shape and
number of classes. The config holds no data-set sizes so that one grid of
configs runs on any data set.

Every layer the watcher should see is a real submodule with a readable name, in
forward order::

    hidden.0.linear, hidden.0.bn, hidden.0.act, hidden.1.linear, ..., out

(``conv`` instead of ``linear`` in the CNN). Activations are modules made by the
registry (``Activation.make_module()``), never functional calls, so hooks see them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.activations import Activation, get_activation
from gradwatch.errors import ConfigError, check_int

__all__ = [
    "INIT_NAMES",
    "MODEL_KINDS",
    "RESIDUAL_BLOCKS",
    "ModelConfig",
    "MLP",
    "ConvNet",
    "build_model",
    "initialize_",
    "activation_gain",
    "count_parameters",
    "describe",
]

MODEL_KINDS = ("mlp", "cnn")
RESIDUAL_BLOCKS = ("simple", "basic")
INIT_NAMES = ("default", "standard", "xavier", "he", "orthogonal", "scaled")
_DEFAULT_WIDTH = 64


@dataclass(frozen=True)
class ModelConfig:
    """What model to build; validated on creation, hashable, JSON-friendly via ``to_dict``.

    Attributes:
        kind: ``"mlp"`` (stack of Linear layers) or ``"cnn"`` (stack of same-padding
            convolutions, Conv1d or Conv2d from the input shape). Default: ``"mlp"``.
        depth: number of hidden layers (conv blocks for the CNN). Default: 5.
        width: units per hidden layer (channels for the CNN). Default: 64.
        activation: registry name (see ``gradwatch.activation_names()``). Default: ``"relu"``.
        activation_params: parameters of the activation, e.g. ``{"negative_slope": 0.1}``;
            a mapping is accepted and stored as a sorted tuple of pairs. Default: none.
        init: ``"default"`` (PyTorch's), ``"standard"``, ``"xavier"``, ``"he"``,
            ``"orthogonal"`` or ``"scaled"``; see :func:`initialize_`. Default: ``"default"``.
        sigma_w2: weight variance scale of the ``"scaled"`` init, W ~ N(0, sigma_w2 / fan_in).
            Default: 1.0.
        sigma_b2: bias variance of the ``"scaled"`` init, b ~ N(0, sigma_b2). Default: 0.0.
        batch_norm: insert BatchNorm between each hidden layer and its activation
            (Ioffe & Szegedy 2015); the layer then has no bias. Default: False.
        residual: add the block's input to its output, h = h + act(bn(layer(h))), in
            every hidden block after the first (which projects to ``width``).
            Default: False.
        block: the residual block. ``"simple"``: one layer, h + act(bn(layer(h))).
            ``"basic"``: He et al. (2016)'s basic block of two layers,
            act(h + bn(layer(act(bn(layer(h)))))), whose branch ends in BN (zero mean) and
            whose activation follows the sum; after the first hidden layer come
            (depth - 1) / 2 of them, so ``depth`` must be odd. Ignored without
            ``residual``. Default: ``"simple"``.
        kernel_size: odd kernel size of the CNN's convolutions. Default: 3.
    """

    kind: str = "mlp"
    depth: int = 5
    width: int = _DEFAULT_WIDTH
    activation: str = "relu"
    activation_params: tuple[tuple[str, Any], ...] = ()
    init: str = "default"
    sigma_w2: float = 1.0
    sigma_b2: float = 0.0
    batch_norm: bool = False
    residual: bool = False
    kernel_size: int = 3
    block: str = "simple"

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ConfigError(
                f"kind={self.kind!r} is not a model kind; expected one of {', '.join(MODEL_KINDS)}"
            )
        _check_int("depth", self.depth, minimum=1, hint="the number of hidden layers")
        _check_int("width", self.width, minimum=1, hint="units (channels) per hidden layer")
        _check_int("kernel_size", self.kernel_size, minimum=1, hint="an odd number such as 3")
        if self.kernel_size % 2 == 0:
            raise ConfigError(
                f"kernel_size={self.kernel_size} is even; expected an odd size (1, 3, 5, ...) "
                "so that same padding keeps the length"
            )
        params = self.activation_params
        if isinstance(params, Mapping):
            params = tuple(sorted(params.items()))
        try:
            params = tuple(sorted((str(k), v) for k, v in params))
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"activation_params={self.activation_params!r} is not a mapping of names to "
                "values; expected e.g. {'negative_slope': 0.1}"
            ) from err
        if not isinstance(self.activation, str):
            raise ConfigError(
                f"activation={self.activation!r} is not a name; expected a registry name "
                "such as 'relu'"
            )
        try:
            act = get_activation(self.activation, **dict(params))
        except ConfigError as err:
            raise ConfigError(f"activation: {err}") from err
        object.__setattr__(self, "activation", act.name)  # canonical: 'LeakyReLU' -> 'leaky_relu'
        object.__setattr__(self, "activation_params", params)
        if self.init not in INIT_NAMES:
            raise ConfigError(
                f"init={self.init!r} is not a known initialisation; expected one of "
                f"{', '.join(INIT_NAMES)}"
            )
        _check_number("sigma_w2", self.sigma_w2, allow_zero=False)
        _check_number("sigma_b2", self.sigma_b2, allow_zero=True)
        for name in ("batch_norm", "residual"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name}={value!r}; expected True or False")
        if self.block not in RESIDUAL_BLOCKS:
            raise ConfigError(
                f"block={self.block!r} is not a residual block; expected one of {', '.join(RESIDUAL_BLOCKS)}"
            )
        if self.residual and self.block == "basic" and self.depth % 2 == 0:
            raise ConfigError(
                f"depth={self.depth} with block='basic'; expected an odd depth (1 + 2 x blocks): the "
                "first hidden layer projects to the width, then each basic block has two layers"
            )

    @property
    def activation_kwargs(self) -> dict[str, Any]:
        """The activation parameters as keyword arguments for ``get_activation``."""
        return dict(self.activation_params)

    def make_activation(self) -> Activation:
        """The registry entry of this config's activation, with its parameters."""
        return get_activation(self.activation, **self.activation_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (activation_params as a dict); inverse of ``from_dict``.

        ``block`` is left out at its default, ``"simple"``: configs stored before it existed
        (and the lab's resume keys made from them) stay the same.
        """
        out = asdict(self)
        out["activation_params"] = dict(self.activation_params)
        if out["block"] == "simple":
            del out["block"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build a config from a dict such as ``to_dict()`` returns; unknown keys are an error."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown model config field(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        return cls(**data)


def _check_number(name: str, value: object, *, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r}; expected a finite number {bound}")


def _check_int(name: str, value: object, *, minimum: int, hint: str) -> None:
    check_int(name, value, minimum, hint)


# --- initialisations ----------------------------------------------------------------------


def activation_gain(activation: Activation) -> float:
    """Gain that keeps the forward signal's scale through ``activation`` (He et al. 2015).

    ``torch.nn.init.calculate_gain`` where it knows the activation: ReLU sqrt(2),
    LeakyReLU sqrt(2 / (1 + slope^2)), tanh 5/3, sigmoid 1. The ReLU-like ELU, GELU and
    SiLU take ReLU's sqrt(2); softsign and hardtanh, linear around 0, take 1.
    """
    name = activation.name
    if name == "leaky_relu":
        return torch.nn.init.calculate_gain("leaky_relu", activation.params["negative_slope"])
    if name in ("relu", "tanh", "sigmoid"):
        return torch.nn.init.calculate_gain(name)
    if name in ("elu", "gelu", "silu"):
        return math.sqrt(2.0)
    return 1.0


def _fans(weight: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear (out, in) or Conv (out, in, *kernel) weight."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _zero_bias_(layer: nn.Module) -> None:
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _init_default_(layer: nn.Module, activation: Activation, sigma_w2: float,
                   sigma_b2: float) -> None:
    """PyTorch's own: W, b ~ U[-1/sqrt(fan_in), 1/sqrt(fan_in)] (``reset_parameters``).

    Its weights are Kaiming-uniform with a = sqrt(5), i.e. Var(W) = 1 / (3 fan_in): the
    same weights as Glorot & Bengio's "standard" init, but with random biases.
    """
    layer.reset_parameters()


def _init_standard_(layer: nn.Module, activation: Activation, sigma_w2: float,
                    sigma_b2: float) -> None:
    """Glorot & Bengio (2010), eq. (1), the "standard" init: W ~ U[-1/sqrt(n), 1/sqrt(n)], b = 0.

    n = fan_in, so Var(W) = 1 / (3 fan_in): the variance of the back-propagated gradient
    shrinks by about a third per layer, the paper's case for normalising.
    """
    bound = 1.0 / math.sqrt(_fans(layer.weight)[0])
    nn.init.uniform_(layer.weight, -bound, bound)
    _zero_bias_(layer)


def _init_xavier_(layer: nn.Module, activation: Activation, sigma_w2: float,
                  sigma_b2: float) -> None:
    """Glorot & Bengio (2010), eq. (16), "normalised" (Xavier) init, b = 0.

    W ~ U[-sqrt(6 / (n_in + n_out)), sqrt(6 / (n_in + n_out))], so
    Var(W) = 2 / (n_in + n_out): a compromise between keeping the forward activations'
    and the backward gradients' variances constant for a linear (or tanh near 0) net.
    """
    nn.init.xavier_uniform_(layer.weight, gain=1.0)
    _zero_bias_(layer)


def _init_he_(layer: nn.Module, activation: Activation, sigma_w2: float,
              sigma_b2: float) -> None:
    """He, Zhang, Ren & Sun (2015), "Delving deep into rectifiers", eq. (10), b = 0.

    W ~ N(0, gain^2 / fan_in): Var(W) = 2 / fan_in for ReLU, 2 / ((1 + a^2) fan_in) for
    LeakyReLU with slope a; keeps the forward second moment constant through rectifiers.
    The gain of other activations is :func:`activation_gain`'s.
    """
    std = activation_gain(activation) / math.sqrt(_fans(layer.weight)[0])
    nn.init.normal_(layer.weight, 0.0, std)
    _zero_bias_(layer)


def _init_orthogonal_(layer: nn.Module, activation: Activation, sigma_w2: float,
                      sigma_b2: float) -> None:
    """Saxe, McClelland & Ganguli (2014): a random orthogonal W times the gain, b = 0.

    W W^T = gain^2 I (rows orthonormal; columns if W is tall; a conv weight is
    flattened to (out, in * kernel)); every singular value equals the gain, so a deep
    linear net neither shrinks nor grows any direction (dynamical isometry). The gain is
    :func:`activation_gain`'s (1 for sigmoid, sqrt(2) for ReLU).
    """
    nn.init.orthogonal_(layer.weight, gain=activation_gain(activation))
    _zero_bias_(layer)


def _init_scaled_(layer: nn.Module, activation: Activation, sigma_w2: float,
                  sigma_b2: float) -> None:
    """The mean-field theory's parametrisation (Poole et al. 2016; Schoenholz et al. 2017).

    W ~ N(0, sigma_w2 / fan_in), b ~ N(0, sigma_b2). The pair (sigma_w2, sigma_b2) sets
    whether a deep net is ordered (gradients vanish), chaotic (they explode) or critical.
    """
    nn.init.normal_(layer.weight, 0.0, math.sqrt(sigma_w2 / _fans(layer.weight)[0]))
    if layer.bias is not None:
        nn.init.normal_(layer.bias, 0.0, math.sqrt(sigma_b2))


_INITS = {
    "default": _init_default_,
    "standard": _init_standard_,
    "xavier": _init_xavier_,
    "he": _init_he_,
    "orthogonal": _init_orthogonal_,
    "scaled": _init_scaled_,
}
_INITIALISED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def initialize_(
    model: nn.Module,
    init: str,
    activation: str | Activation = "relu",
    *,
    sigma_w2: float = 1.0,
    sigma_b2: float = 0.0,
) -> nn.Module:
    """Re-initialise every Linear and Conv layer of ``model`` in place; returns ``model``.

    Works on any model, not only the lab's (the what-if trials re-initialise users'
    models). BatchNorm and other layers keep their parameters.

    Args:
        model: the module whose Linear/Conv weights and biases are drawn anew.
        init: one of ``INIT_NAMES``:

            * ``"default"``: PyTorch's, W, b ~ U[-1/sqrt(fan_in), 1/sqrt(fan_in)].
            * ``"standard"``: Glorot & Bengio 2010, W ~ U[-1/sqrt(fan_in), 1/sqrt(fan_in)], b = 0.
            * ``"xavier"``: Glorot & Bengio 2010, Var(W) = 2 / (fan_in + fan_out), b = 0.
            * ``"he"``: He et al. 2015, W ~ N(0, gain^2 / fan_in), b = 0.
            * ``"orthogonal"``: Saxe et al. 2014, W W^T = gain^2 I, b = 0.
            * ``"scaled"``: W ~ N(0, sigma_w2 / fan_in), b ~ N(0, sigma_b2).
        activation: the activation that follows the layers (name or registry entry);
            sets the gain of ``"he"`` and ``"orthogonal"``. Default: ``"relu"``.
        sigma_w2: weight variance scale of ``"scaled"``. Default: 1.0.
        sigma_b2: bias variance of ``"scaled"``. Default: 0.0.

    Raises:
        ConfigError: unknown init or activation.
    """
    if init not in _INITS:
        raise ConfigError(
            f"init={init!r} is not a known initialisation; expected one of {', '.join(INIT_NAMES)}"
        )
    act = get_activation(activation) if isinstance(activation, str) else activation
    scheme = _INITS[init]
    for module in model.modules():
        if isinstance(module, _INITIALISED):
            scheme(module, act, sigma_w2, sigma_b2)
    return model


# --- models -------------------------------------------------------------------------------


class _Block(nn.Module):
    """One hidden layer: a = act(bn(layer(h))); returns h + a if residual else a.

    Submodules are registered in forward order: ``linear``/``conv``, ``bn``, ``act``.
    """

    def __init__(self, layer_name: str, layer: nn.Module, norm: nn.Module | None,
                 act: nn.Module, residual: bool) -> None:
        super().__init__()
        self.layer_name = layer_name
        self.add_module(layer_name, layer)
        if norm is not None:
            self.bn = norm
        self.act = act
        self.residual = residual

    def forward(self, h: Tensor) -> Tensor:  # noqa: D102
        z = getattr(self, self.layer_name)(h)
        if "bn" in self._modules:
            z = self.bn(z)
        a = self.act(z)
        return h + a if self.residual else a

    def extra_repr(self) -> str:  # noqa: D102
        return "residual=True" if self.residual else ""


class _BasicBlock(nn.Module):
    """He et al. (2016)'s basic block: act(h + bn2(layer2(act1(bn1(layer1(h)))))).

    Submodules in forward order: ``linear1``/``conv1``, ``bn1``, ``act1``, ``linear2``/``conv2``,
    ``bn2``, ``act2`` (no ``bn`` without batch norm).
    """

    def __init__(self, layer_name: str, layers: tuple[nn.Module, nn.Module],
                 norms: tuple[nn.Module | None, nn.Module | None], acts: tuple[nn.Module, nn.Module]) -> None:
        super().__init__()
        self.layer_name = layer_name
        for i, (layer, norm, act) in enumerate(zip(layers, norms, acts, strict=True), start=1):
            self.add_module(f"{layer_name}{i}", layer)
            if norm is not None:
                self.add_module(f"bn{i}", norm)
            self.add_module(f"act{i}", act)

    def _branch(self, i: int, h: Tensor) -> Tensor:
        z = self._modules[f"{self.layer_name}{i}"](h)
        return self._modules[f"bn{i}"](z) if f"bn{i}" in self._modules else z

    def forward(self, h: Tensor) -> Tensor:  # noqa: D102
        a = self.act1(self._branch(1, h))
        return self.act2(h + self._branch(2, a))


def _hidden(config: ModelConfig, n_in: int, layer_name: str, make_layer, make_norm) -> nn.Sequential:
    """The hidden blocks: ``make_layer(n_in)`` and ``make_norm()`` (None without batch norm)
    build one layer and its norm; simple blocks, or a first block then basic blocks.
    """
    def act() -> nn.Module:
        return config.make_activation().make_module()

    if config.residual and config.block == "basic":
        blocks: list[nn.Module] = [_Block(layer_name, make_layer(n_in), make_norm(), act(), residual=False)]
        for _ in range((config.depth - 1) // 2):
            blocks.append(_BasicBlock(layer_name, (make_layer(config.width), make_layer(config.width)),
                                      (make_norm(), make_norm()), (act(), act())))
        return nn.Sequential(*blocks)
    return nn.Sequential(*(
        _Block(layer_name, make_layer(n_in if i == 0 else config.width), make_norm(), act(),
               residual=config.residual and i > 0)
        for i in range(config.depth)
    ))


class MLP(nn.Module):
    """``depth`` hidden blocks ``hidden.i`` (linear, [bn], act) and a Linear ``out``.

    Inputs of any shape (N, ...) are flattened to (N, in_features).
    """

    def __init__(self, config: ModelConfig, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.config = config
        self.hidden = _hidden(
            config, in_features, "linear",
            lambda n_in: nn.Linear(n_in, config.width, bias=not config.batch_norm),
            lambda: nn.BatchNorm1d(config.width) if config.batch_norm else None,
        )
        self.out = nn.Linear(config.width, n_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.out(self.hidden(x.flatten(1)))


class _Reshape(nn.Module):
    """Views flat inputs (N, C * L) or (N, C * H * W) as (N, *shape)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:  # noqa: D102
        return f"shape={self.shape}"


class ConvNet(nn.Module):
    """A small CNN: ``depth`` same-padding conv blocks of ``width`` channels, then ``out``.

    The input shape picks the dimension: (C, L) builds Conv1d/BatchNorm1d (MNIST-1D as
    1 x 40), (C, H, W) builds Conv2d/BatchNorm2d (digits as 1 x 8 x 8). Inputs may come
    flat, (N, C * L) or (N, C * H * W), and are reshaped first. Stride 1 keeps the
    spatial size, so every block after the first can be residual; ``out`` is a Linear
    on the flattened last feature map (no pooling: position matters for digits).
    """

    def __init__(self, config: ModelConfig, input_shape: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        self.config = config
        conv_type, norm_type = {2: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv2d, nn.BatchNorm2d)}[
            len(input_shape)
        ]
        self.reshape = _Reshape(input_shape)
        self.hidden = _hidden(
            config, input_shape[0], "conv",
            lambda n_in: conv_type(n_in, config.width, config.kernel_size,
                                   padding=config.kernel_size // 2, bias=not config.batch_norm),
            lambda: norm_type(config.width) if config.batch_norm else None,
        )
        self.flatten = nn.Flatten()
        self.out = nn.Linear(config.width * math.prod(input_shape[1:]), n_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.out(self.flatten(self.hidden(self.reshape(x))))


def _input_shape(kind: str, input_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ConfigError(
            f"input_shape={input_shape!r}; expected positive integers, e.g. 64 or (1, 8, 8)"
        )
    if kind == "cnn":
        if len(shape) == 1:
            shape = (1, shape[0])  # a flat vector is a one-channel signal
        if len(shape) not in (2, 3):
            raise ConfigError(
                f"input_shape={shape} for a cnn; expected (channels, length) for Conv1d or "
                "(channels, height, width) for Conv2d"
            )
    return shape


def build_model(
    config: ModelConfig,
    input_shape: int | Sequence[int],
    n_classes: int,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build and initialise the model ``config`` describes for one data set.

    Args:
        config: what to build.
        input_shape: shape of one example, e.g. ``dataset.input_shape``: an int (the
            number of features) or a tuple; the MLP uses its product, the CNN its form
            ((C, L) -> Conv1d, (C, H, W) -> Conv2d, an int n -> (1, n)).
        n_classes: outputs of the last layer (logits).
        seed: if given, parameters are drawn from ``torch.manual_seed(seed)`` in a forked
            RNG state, so the same seed gives the same weights and the global RNG is left
            alone. Default: None (use the global RNG).

    Raises:
        ConfigError: a bad input shape or number of classes.
    """
    shape = _input_shape(config.kind, input_shape)
    _check_int("n_classes", n_classes, minimum=1, hint="outputs of the last layer")
    if seed is None:
        return _build(config, shape, n_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(config, shape, n_classes)


def _build(config: ModelConfig, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    if config.kind == "mlp":
        model: nn.Module = MLP(config, math.prod(shape), n_classes)
    else:
        model = ConvNet(config, shape, n_classes)
    if config.init != "default":  # the layers' constructors already drew PyTorch's default
        initialize_(model, config.init, config.make_activation(),
                    sigma_w2=config.sigma_w2, sigma_b2=config.sigma_b2)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``model`` (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _number(value: float) -> str:
    return f"{value:g}"


def describe(config: ModelConfig) -> str:
    """One-line human label, e.g. ``"sigmoid depth 20, default init"``.

    Adds ``cnn`` for CNNs, the activation's parameters, the width when it is not the
    default 64, the scaled init's variances, ``batch norm`` and ``residual``.
    """
    act = config.activation
    if config.activation_params:
        act += "(" + ", ".join(
            _number(v) if isinstance(v, (int, float)) else str(v)
            for _, v in config.activation_params
        ) + ")"
    head = f"{'cnn ' if config.kind == 'cnn' else ''}{act} depth {config.depth}"
    if config.width != _DEFAULT_WIDTH:
        head += f" width {config.width}"
    init = f"{config.init} init"
    if config.init == "scaled":
        init += f" (sigma_w^2={_number(config.sigma_w2)}, sigma_b^2={_number(config.sigma_b2)})"
    parts = [head, init]
    if config.batch_norm:
        parts.append("batch norm")
    if config.residual:
        parts.append("residual (basic blocks)" if config.block == "basic" else "residual")
    return ", ".join(parts)

