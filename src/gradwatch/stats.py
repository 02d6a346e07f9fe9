"""Pure statistics on tensors: norms, RMS and activation-region fractions.

Every function here runs on the tensors' own device and returns 0-d tensors
(never Python floats), so the watcher can stack all of a step's statistics and
move them to the host in one transfer. No I/O, no state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradwatch.activations import Activation

__all__ = [
    "squared_norm",
    "output_moments",
    "activation_region_stats",
    "unit_dim",
    "ACTIVATION_STATS",
]

# Order of the values returned by `activation_region_stats`.
ACTIVATION_STATS = ("saturated_frac", "green_frac", "dead_frac", "mean_derivative")


def squared_norm(tensor: Tensor) -> Tensor:
    """``sum(tensor**2)`` as a float32 (or float64) 0-d tensor, without a full-size temporary.

    Summed over calls and micro-batches and divided by the element count this
    gives the RMS: ``delta_rms = sqrt(sum_i ||g_i||^2 / sum_i numel(g_i))``.
    """
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(tensor, dtype=dtype).square()


def output_moments(output: Tensor) -> Tensor:
    """``[mean, std]`` of a module's output over all its elements (the forward signal).

    ``std`` is the population standard deviation (``correction=0``), defined for one element.
    """
    x = output.detach()
    if not x.is_floating_point():
        x = x.float()
    std, mean = torch.std_mean(x, correction=0)
    return torch.stack([mean, std]).float()


def unit_dim(ndim: int, channels_first: bool) -> int:
    """Which dimension indexes units: features for (N, F) and (N, T, F), channels for conv maps."""
    if ndim <= 1:
        return 0
    if ndim == 2:
        return 1
    return 1 if channels_first else ndim - 1


def activation_region_stats(
    x: Tensor,
    activation: Activation,
    *,
    channels_first: bool = False,
    saturation_fraction: float = 0.1,
    green_fraction: float = 0.5,
) -> Tensor:
    """Saturated, green and dead fractions and the mean derivative at the inputs ``x``.

    With ``d = phi'(x)`` and ``m = max phi'``:

    * ``saturated_frac = mean(d < saturation_fraction * m)``, NaN for activations
      without flat tails (ReLU, LeakyReLU), where the zero side is "dead", not saturated;
    * ``green_frac = mean(d >= green_fraction * m)`` (the seeds' green region);
    * ``dead_frac`` = fraction of units whose ``d`` is zero for every element of
      the batch (and every position), i.e. units that pass no gradient back;
    * ``mean_derivative = mean(d)``, the factor this layer contributes, on
      average, to the product of derivatives.

    Args:
        x: the activation's input (pre-activation), any shape with batch first.
        activation: registry entry giving ``phi'``.
        channels_first: units are along dim 1 (conv maps) rather than the last dim.
        saturation_fraction: fraction of ``max phi'`` below which an input is saturated.
        green_fraction: fraction of ``max phi'`` at and above which an input is green.

    Returns:
        A float32 tensor of 4 values in the order of :data:`ACTIVATION_STATS`.
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    d = activation.derivative(x).abs()
    m = activation.max_derivative
    green = (d >= green_fraction * m).float().mean()
    mean_derivative = d.mean(dtype=torch.float32)
    if activation.saturating:
        saturated = (d < saturation_fraction * m).float().mean()
    else:
        saturated = torch.full((), float("nan"), device=x.device)
    if x.ndim >= 2:
        dim = unit_dim(x.ndim, channels_first)
        reduce_dims = [i for i in range(x.ndim) if i != dim]
        alive = (d > 0).to(torch.uint8).amax(dim=reduce_dims)
        dead = 1.0 - alive.float().mean()
    else:
        dead = (d.amax() <= 0).float()
    return torch.stack([saturated.float(), green.float(), dead.float(), mean_derivative.float()])
