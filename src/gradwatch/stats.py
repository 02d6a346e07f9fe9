"""Pure statistics on tensors: norms, RMS and activation-region fractions.

Every function here runs on the tensors' own device and returns 0-d tensors
(never Python floats), so the watcher can stack all of a step's statistics and
move them to the host in one transfer. No I/O, no state.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gradwatch.activations import Activation

__all__ = [
    "squared_norm",
    "output_moments",
    "activation_region_stats",
    "activation_inputs",
    "batched_region_stats",
    "region_stats_rows",
    "moments_from_sums",
    "sample_index",
    "weight_block",
    "tracked_positions",
    "UPDATE_SAMPLE",
    "unit_dim",
    "ACTIVATION_STATS",
    "INPUT_QUANTILES",
    "input_quantiles",
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
    """``[sum(x), ||x||_2]`` of a module's output: the forward signal's first two moments.

    With ``n`` elements, ``mean = sum / n`` and ``std = sqrt(||x||^2 / n - mean^2)``
    (population std). Sums of several calls (a module used twice, micro-batches)
    pool exactly. Two fast reductions: ``torch.std_mean`` costs ten times more on CPU.
    """
    x = output.detach()
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not x.is_floating_point():
        x = x.float()
    return torch.stack([x.sum(dtype=dtype), torch.linalg.vector_norm(x, dtype=dtype)]).float()


def moments_from_sums(total: float, norm_sq: float, count: int) -> tuple[float, float]:
    """Mean and population std from ``sum(x)``, ``sum(x^2)`` and the element count."""
    mean = total / count
    return mean, math.sqrt(max(norm_sq / count - mean * mean, 0.0))


def unit_dim(ndim: int, channels_first: bool) -> int:
    """Which dimension indexes units: features for (N, F) and (N, T, F), channels for conv maps."""
    if ndim <= 1:
        return 0
    if ndim == 2:
        return 1
    return 1 if channels_first else ndim - 1


def sample_index(numel: int, size: int, device: torch.device, seed: int = 0) -> Tensor | None:
    """A fixed random sample of ``size`` flat indices into ``numel`` elements (None: use all)."""
    if size <= 0 or numel <= size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, numel, (size,), generator=generator).to(device)


# Update ratios are measured on a fixed contiguous block of this many elements per weight
# (exact for smaller weights): a full copy of every weight costs more than the step.
UPDATE_SAMPLE = 4096


def weight_block(numel: int, index: int, size: int = UPDATE_SAMPLE) -> tuple[int, int]:
    """``(start, length)`` of parameter ``index``'s sampled block: ``size`` contiguous elements.

    The offset ``(index * 7919) % (numel - size + 1)`` is fixed per parameter and spreads
    the blocks over the weights; a weight of at most ``size`` elements is taken whole.
    Whole rows of a weight matrix are a fair sample (units are exchangeable at
    initialisation), and a contiguous copy costs a third of a scattered gather on CPU.
    """
    if numel <= size:
        return 0, numel
    return (index * 7919) % (numel - size + 1), size


def tracked_positions(length: int, count: int, seed: int) -> list[int]:
    """``count`` fixed random positions (sorted) in a block of ``length`` elements."""
    count = min(count, length)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=generator)[:count].sort().values.tolist()


def activation_region_stats(
    x: Tensor,
    activation: Activation,
    *,
    channels_first: bool = False,
    sample: Tensor | None = None,
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

    The three means are taken over ``x.flatten()[sample]`` when a sample of
    indices is given (a random sample of k inputs estimates a fraction with a
    standard error of at most ``0.5 / sqrt(k)``), else over every input. The dead
    fraction is always exact: with ``activation.peak`` it needs one reduction per
    unit (the largest input, or the one nearest zero), then phi' of those.

    Args:
        x: the activation's input (pre-activation), any shape with batch first.
        activation: registry entry giving ``phi'``.
        channels_first: units are along dim 1 (conv maps) rather than the last dim.
        sample: flat indices of the inputs to average over (None: all of them).
        saturation_fraction: fraction of ``max phi'`` below which an input is saturated.
        green_fraction: fraction of ``max phi'`` at and above which an input is green.

    Returns:
        A float32 tensor of 4 values in the order of :data:`ACTIVATION_STATS`.
    """
    kept = activation_inputs(x, activation, channels_first=channels_first, sample=sample)
    return batched_region_stats(
        [kept], activation, saturation_fraction=saturation_fraction, green_fraction=green_fraction
    )[0]


def activation_inputs(
    x: Tensor, activation: Activation, *, channels_first: bool = False, sample: Tensor | None = None
) -> tuple[Tensor, Tensor, bool]:
    """What a hook keeps of an activation's input for :func:`batched_region_stats`.

    Returns ``(inputs, per_unit, is_derivative)``: the sampled (or all) inputs, and
    per unit the input where phi' is largest (``activation.peak``) or, without a
    peak rule, that largest phi' itself. Two or three reductions, no phi'.
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    inputs = x.reshape(-1) if sample is None else x.reshape(-1).index_select(0, sample)
    if sample is None:
        inputs = inputs.clone()  # the hook's input may be overwritten in place
    if x.ndim < 2:
        return inputs, activation.derivative(x).abs().amax().reshape(1), True
    dim = unit_dim(x.ndim, channels_first)
    reduce_dims = [i for i in range(x.ndim) if i != dim]
    if activation.peak == "max":
        return inputs, x.amax(dim=reduce_dims), False
    if activation.peak == "min_abs":
        return inputs, x.abs().amin(dim=reduce_dims), False
    return inputs, activation.derivative(x).abs().amax(dim=reduce_dims), True


def batched_region_stats(
    kept: list[tuple[Tensor, Tensor, bool]],
    activation: Activation,
    *,
    saturation_fraction: float = 0.1,
    green_fraction: float = 0.5,
) -> Tensor:
    """:func:`activation_region_stats` for many layers of one activation at once.

    ``kept`` holds :func:`activation_inputs` results, one per layer (or call).
    Returns a float32 ``(len(kept), 4)`` tensor in the order of :data:`ACTIVATION_STATS`,
    equal to calling :func:`activation_region_stats` on each, in a fixed number of ops.
    """
    device = kept[0][0].device
    m = activation.max_derivative
    sizes = [inputs.numel() for inputs, _, _ in kept]
    unit_sizes = [units.numel() for _, units, _ in kept]
    if len(set(sizes)) == 1 and len(set(unit_sizes)) == 1 and not any(is_d for _, _, is_d in kept):
        # the usual case (one sample size, one width): (layers, n) matrices
        return region_stats_rows(
            torch.stack([inputs for inputs, _, _ in kept]),
            torch.stack([units for _, units, _ in kept]),
            activation,
            saturation_fraction=saturation_fraction,
            green_fraction=green_fraction,
        )

    d = _abs_derivative(activation, torch.cat([inputs for inputs, _, _ in kept]))
    per_input = torch.stack([d < saturation_fraction * m, d >= green_fraction * m]).float()
    per_input = torch.cat([per_input, d.float().unsqueeze(0)])
    sums = _segment_sums(per_input, sizes) / torch.tensor(sizes, device=device, dtype=torch.float32)
    saturated = sums[0] if activation.saturating else torch.full_like(sums[0], float("nan"))

    if any(is_d for _, _, is_d in kept):
        best = torch.cat([u if is_d else _abs_derivative(activation, u) for _, u, is_d in kept])
    else:
        best = _abs_derivative(activation, torch.cat([u for _, u, _ in kept]))
    dead_counts = _segment_sums((best <= 0).float().unsqueeze(0), unit_sizes)[0]
    dead = dead_counts / torch.tensor(unit_sizes, device=device, dtype=torch.float32)
    return torch.stack([saturated, sums[1], dead, sums[2]], dim=1)


def region_stats_rows(
    inputs: Tensor,
    units: Tensor,
    activation: Activation,
    *,
    saturation_fraction: float = 0.1,
    green_fraction: float = 0.5,
) -> Tensor:
    """:func:`batched_region_stats` of layers kept as rows: ``inputs`` ``(layers, n)``, ``units``
    ``(layers, u)`` (per unit the input where phi' peaks, see :func:`activation_inputs`).

    Reductions along rows: no concatenations and no float copies of the masks, which the
    general path needs for inputs of several sizes. Returns a float32 ``(layers, 4)`` tensor
    in the order of :data:`ACTIVATION_STATS`.
    """
    m = activation.max_derivative
    d = _abs_derivative(activation, inputs)
    n = float(inputs.shape[1])
    f32 = torch.float32
    saturated = (d < saturation_fraction * m).sum(1, dtype=f32).div_(n)
    if not activation.saturating:
        saturated.fill_(float("nan"))
    green = (d >= green_fraction * m).sum(1, dtype=f32).div_(n)
    mean_derivative = d.sum(1, dtype=f32).div_(n)
    dead = (_abs_derivative(activation, units) <= 0).sum(1, dtype=f32).div_(float(units.shape[1]))
    return torch.stack([saturated, green, dead, mean_derivative], dim=1)


def _abs_derivative(activation: Activation, x: Tensor) -> Tensor:
    """``|phi'(x)|``, one op fewer where phi' is never negative (``activation.nonnegative``)."""
    d = activation.derivative(x)
    return d if activation.nonnegative else d.abs()


INPUT_QUANTILES = (0.15, 0.5, 0.85)
# Quantiles come from the first this-many inputs of the (random) sample: sorting is the
# cost, growing with the sample, and 256 inputs give the 15th percentile within about
# +-0.03 in probability.
QUANTILE_SAMPLE = 256


def input_quantiles(inputs: list[Tensor] | Tensor, q: tuple[float, ...] = INPUT_QUANTILES) -> Tensor:
    """The ``q`` quantiles of each tensor of ``inputs`` (an activation's kept inputs), or of
    each row of a 2-D tensor.

    Ioffe & Szegedy (2015), Figure 1, plot the 15th, 50th and 85th percentiles of a
    sigmoid's input over training: without batch normalisation they drift into the
    flat tails. Returns a float32 ``(len(inputs), len(q))`` tensor (linear
    interpolation, as :func:`torch.quantile`) over :data:`QUANTILE_SAMPLE` values of
    each tensor taken at a fixed stride (the watcher's kept inputs are a random sample
    already; for an unsampled input the stride spreads them over the whole batch).
    """
    if not isinstance(inputs, Tensor):
        if len({x.numel() for x in inputs}) > 1:
            return _quantiles_each(inputs, q)
        # the usual case, one size: a fixed number of ops for all the layers
        inputs = torch.stack([x if x.ndim == 1 else x.reshape(-1) for x in inputs])
    rows, n = inputs.float(), inputs.shape[1]
    if n > QUANTILE_SAMPLE:
        rows = rows[:, :: n // QUANTILE_SAMPLE][:, :QUANTILE_SAMPLE]
    return _sorted_quantiles(rows, q)


def _quantiles_each(inputs: list[Tensor], q: tuple[float, ...]) -> Tensor:
    """:func:`input_quantiles` of tensors of several sizes, one by one."""
    levels = torch.tensor(q, device=inputs[0].device, dtype=torch.float32)
    flat = []
    for x in inputs:
        x = x.reshape(-1).float()
        if x.numel() > QUANTILE_SAMPLE:
            x = x[:: x.numel() // QUANTILE_SAMPLE][:QUANTILE_SAMPLE]
        flat.append(x)
    return torch.stack([torch.quantile(x, levels) for x in flat])


def _sorted_quantiles(rows: Tensor, q: tuple[float, ...]) -> Tensor:
    """``torch.quantile(rows, q, dim=1).T`` (linear interpolation) as one sort and one lerp.

    The same values as ``torch.quantile``: the ranks ``q * (n - 1)`` in the rows' dtype, and
    NaN for a row holding a NaN (both sorts put NaN last). On the CPU numpy sorts: for short
    rows its sort has a fraction of ``torch.sort``'s per-call overhead.
    """
    n = rows.shape[1]
    key = (n, tuple(q), rows.dtype, rows.device)
    ranks = _RANKS.get(key)
    if ranks is None:  # the ranks below and above each quantile, and the weight between them
        position = torch.tensor(q, dtype=rows.dtype) * (n - 1)
        low = position.long()
        both = torch.cat([low, torch.clamp(low + 1, max=n - 1)]).to(rows.device)
        ranks = _RANKS[key] = (both, (position - low).to(rows.device))
        if len(_RANKS) > 64:
            _RANKS.clear()
    both, weight = ranks
    if rows.is_cpu and rows.dtype in (torch.float32, torch.float64):
        # numpy's sort of short rows costs less than torch.sort's dispatch; the same values
        ordered = torch.from_numpy(np.sort(rows.detach().numpy(), axis=1))
    else:
        ordered = rows.sort(dim=1).values
    around = ordered[:, both]
    values = torch.lerp(around[:, : len(q)], around[:, len(q) :], weight)
    last = ordered[:, -1:]
    return torch.where(last.isnan(), last, values)


_RANKS: dict[tuple, tuple[Tensor, Tensor]] = {}  # see _sorted_quantiles


def _segment_sums(values: Tensor, sizes: list[int]) -> Tensor:
    """Sums of consecutive segments of ``values`` (rows x sum(sizes)) -> rows x len(sizes)."""
    if len(set(sizes)) == 1:  # the usual case: a reshape and a sum, no scatter of index_add_
        return values.reshape(values.shape[0], len(sizes), sizes[0]).sum(2)
    out = torch.zeros(values.shape[0], len(sizes), device=values.device, dtype=values.dtype)
    return out.index_add_(1, _segments(sizes, values.device), values)


_SEGMENT_CACHE: dict[tuple, Tensor] = {}


def _segments(sizes: list[int], device: torch.device) -> Tensor:
    """``[0]*sizes[0] + [1]*sizes[1] + ...`` as a tensor, cached by shape."""
    key = (tuple(sizes), device)
    seg = _SEGMENT_CACHE.get(key)
    if seg is None:
        seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
        if len(_SEGMENT_CACHE) > 256:
            _SEGMENT_CACHE.clear()
        _SEGMENT_CACHE[key] = seg
    return seg
