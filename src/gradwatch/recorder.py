"""The per-step record: every number a logged step stores, defined once.

DESIGN.md's data flow is hooks -> recorder -> store -> readers. Two writers measure
steps: :class:`gradwatch.watch.Watcher` (hooks on one model) and
:mod:`gradwatch.lab.vectorized` (K seeds of one configuration stacked into one batched
network). Each measures a step its own way, then hands this module the same raw
quantities (sums of squares, element counts, per-parameter norms, region statistics
per call) with a leading run axis, K = 1 for the watcher. Everything derived from them
is computed here:

- :class:`Window`: the extremes of every step's gradient norms between two logged steps;
- :func:`activation_stat_rows`: the region statistics and input quantiles of the
  activation calls, one batch per activation kind;
- :class:`LayerRows`: the ``(runs, layers, LAYER_METRICS)`` table of a logged step
  (``delta_rms``, output moments, activation fractions, ``grad_norm``, ``weight_norm``,
  ``update_ratio``, the window's ``grad_norm_max`` / ``_min``);
- :func:`step_scalars`: the global scalars of a logged step and their names;
- :func:`tracked_elements` and :func:`gradwatch_config`: which weights are tracked and
  what a run's config says about how it was recorded.

Per-layer sums go through :func:`numpy.bincount` over ``run * layers + layer_id``, which
adds each layer's entries in the order given, starting from 0: the K runs of a batched
group get the bits K separate watchers would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch.activations import Activation
from gradwatch.stats import (
    ACTIVATION_STATS,
    batched_region_stats,
    input_quantiles,
    region_stats_rows,
    tracked_positions,
    weight_block,
)
from gradwatch.store import LAYER_METRICS

__all__ = [
    "ACTIVATION_SAMPLE",
    "DEFAULT_EVERY",
    "WEIGHT_SAMPLES",
    "ActivationCalls",
    "LayerRows",
    "ParamLayout",
    "Window",
    "activation_stat_rows",
    "gradwatch_config",
    "step_scalars",
    "tracked_columns",
    "tracked_elements",
]

# Log every 50th step by default (Lightning's log_every_n_steps; wandb.watch's log_freq is
# 1,000): a logged step costs about one unwatched step on a small CPU model, and the
# window keeps every step's gradient-norm extremes in between.
DEFAULT_EVERY = 50
# Activation inputs averaged per layer (standard error of a fraction <= 0.5 / sqrt(2048)).
ACTIVATION_SAMPLE = 2048
# Tracked weight elements per layer: the seeds' "plots of weights against epochs".
WEIGHT_SAMPLES = 8
# The window folds its steps' norm vectors into running extremes this many at a time.
WINDOW_CHUNK = 64

QUANTILE_METRICS = ("input_q15", "input_q50", "input_q85")  # stats.INPUT_QUANTILES
ACTIVATION_METRICS = ACTIVATION_STATS + QUANTILE_METRICS  # the columns of activation_stat_rows
METRIC_INDEX = {name: i for i, name in enumerate(LAYER_METRICS)}
_ACTIVATION_COLUMNS = np.array([METRIC_INDEX[m] for m in ACTIVATION_METRICS])
_SATURATED_K = ACTIVATION_METRICS.index("saturated_frac")


# --- the window --------------------------------------------------------------------------------


class Window:
    """Extremes of the per-step gradient norms since the last logged step, on device.

    ``shape`` is ``(*runs, parameters)``: ``(P,)`` for one watcher, ``(K, P)`` for K
    stacked seeds. A step adds its norms to a list (no op); the list is folded into the
    running extremes (a dozen ops for all of its steps at once) when the window is read
    or holds :data:`WINDOW_CHUNK` steps. A step on which some parameters had no gradient
    is folded at once, by index along the last dimension. NaN propagates into the max
    and min (as in ``torch.maximum``), so a non-finite spike is kept.
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> None:
        lead = shape[:-1]
        self.device = torch.device(device)
        self.max = torch.full(shape, -math.inf, device=device)
        self.min = torch.full(shape, math.inf, device=device)
        self.first_bad = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.total_max = torch.full(lead, -math.inf, device=device)
        self.total_min = torch.full(lead, math.inf, device=device)
        self.bad_max = torch.zeros(lead, device=device)
        self.steps = 0
        self._pending: list[Tensor] = []  # full norm vectors of the steps not folded yet
        self._pending_steps: list[int] = []

    def add(self, step: int, norms: Tensor, index: Tensor | None = None) -> None:
        """Add one step's per-parameter norms (of the parameters ``index``; None: all)."""
        self.steps += 1
        if index is None:
            self._pending.append(norms)
            self._pending_steps.append(step)
            if len(self._pending) >= WINDOW_CHUNK:
                self.fold()
            return
        self.fold()
        bad = ~torch.isfinite(norms)
        total = torch.linalg.vector_norm(norms, dim=-1)
        self.max.index_copy_(-1, index, torch.maximum(self.max.index_select(-1, index), norms))
        self.min.index_copy_(-1, index, torch.minimum(self.min.index_select(-1, index), norms))
        first = self.first_bad.index_select(-1, index)
        self.first_bad.index_copy_(-1, index, first.masked_fill_((first < 0) & bad, step))
        torch.maximum(self.total_max, total, out=self.total_max)
        torch.minimum(self.total_min, total, out=self.total_min)
        torch.maximum(self.bad_max, bad.sum(-1).float(), out=self.bad_max)

    def fold(self) -> None:
        """Fold the pending steps into the running extremes."""
        if not self._pending:
            return
        norms = torch.stack(self._pending)  # (steps, *runs, parameters)
        steps = torch.tensor(self._pending_steps, device=self.device)
        self._pending, self._pending_steps = [], []
        bad = ~torch.isfinite(norms)
        totals = torch.linalg.vector_norm(norms, dim=-1)
        torch.maximum(self.max, norms.amax(0), out=self.max)
        torch.minimum(self.min, norms.amin(0), out=self.min)
        first = steps[bad.to(torch.uint8).argmax(0)]  # the first bad step of each parameter
        self.first_bad.copy_(torch.where((self.first_bad < 0) & bad.any(0), first, self.first_bad))
        torch.maximum(self.total_max, totals.amax(0), out=self.total_max)
        torch.minimum(self.total_min, totals.amin(0), out=self.total_min)
        torch.maximum(self.bad_max, bad.sum(-1).amax(0).float(), out=self.bad_max)

    def totals(self) -> Tensor:
        """``(*runs, 3)``: the max and min of the total gradient norm, the most non-finite norms of a step."""
        return torch.stack([self.total_max, self.total_min, self.bad_max], -1)


# --- activation statistics ---------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationCalls:
    """The kept inputs of one activation kind's calls in a step (:func:`~gradwatch.stats.activation_inputs`).

    ``inputs[i]`` and ``units[i]`` are one call's (1-D) or rows of calls' (2-D) sampled
    inputs and per-unit peak inputs, the 1-D entries first; ``derivative[i]`` says that
    ``units[i]`` holds derivatives already.
    """

    activation: Activation
    inputs: Sequence[Tensor]
    units: Sequence[Tensor]
    derivative: Sequence[bool]


def activation_stat_rows(calls: ActivationCalls) -> Tensor:
    """Region statistics, then input quantiles, of every call: float32 ``(calls, 7)``.

    Columns: :data:`gradwatch.stats.ACTIVATION_STATS` (saturated, green and dead
    fractions, mean ``|phi'|``) and the 15/50/85% quantiles of the inputs (Ioffe &
    Szegedy 2015, Figure 1). Rows: the calls in the order given, the rows of a 2-D entry in
    its place; the 1-D entries must come first (the order one stacked matrix holds them in).
    """
    inputs, units, derivative = list(calls.inputs), list(calls.units), list(calls.derivative)
    with torch.no_grad():
        if (
            len({x.shape[-1] for x in inputs}) == 1
            and len({u.shape[-1] for u in units}) == 1
            and not any(derivative)
        ):  # the usual case: one (calls, n) matrix
            matrix = _rows(inputs)
            regions = region_stats_rows(matrix, _rows(units), calls.activation)
            return torch.cat([regions, input_quantiles(matrix)], 1)
        flat = [
            (x, u, d)
            for xs, us, d in zip(inputs, units, derivative, strict=True)
            for x, u in (zip(xs, us, strict=True) if xs.ndim == 2 else [(xs, us)])
        ]
        regions = batched_region_stats(flat, calls.activation)
        return torch.cat([regions, input_quantiles([x for x, _, _ in flat])], 1)


def _rows(tensors: list[Tensor]) -> Tensor:
    """Vectors (1-D, stacked first) and matrices of rows of one length as one matrix."""
    single = [t for t in tensors if t.ndim == 1]
    pieces = ([torch.stack(single)] if single else []) + [t for t in tensors if t.ndim == 2]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# --- the layer table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamLayout:
    """Which parameters make each parameterised layer's norms: one entry per (layer, parameter).

    ``params[e]`` indexes the per-parameter gradient norms, ``slots[e]`` the weight and
    update norms (taken over the chosen parameters only), ``lids[e]`` is the layer.
    """

    params: np.ndarray
    lids: np.ndarray
    slots: np.ndarray


class LayerRows:
    """The per-layer values of one logged step of ``runs`` runs: ``(runs, layers, LAYER_METRICS)``.

    Cells without a value stay NaN and not :attr:`present`. Each ``add_*`` method
    derives its metrics from raw sums; entries are keyed by ``(run, layer id)`` and
    summed per layer in the order given.
    """

    def __init__(self, runs: int, layers: int) -> None:
        self.runs, self.layers = runs, layers
        self.table = np.full((runs, layers, len(LAYER_METRICS)), np.nan)
        self.present = np.zeros(self.table.shape, dtype=bool)

    def _keys(self, runs: np.ndarray | int, lids: np.ndarray | Sequence[int],
              shape: tuple[int, ...]) -> np.ndarray:
        """The flat ``run * layers + layer id`` of each entry of an array of ``shape``."""
        lids = np.asarray(lids, dtype=np.intp)
        if self.runs == 1:  # one run (the watcher): the layer ids are the keys
            return lids.reshape(-1)
        return np.broadcast_to(np.asarray(runs) * self.layers + lids, shape).reshape(-1)

    def _sum(self, keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Per-layer sums ``(runs, layers)`` of ``weights``, added in the order given from 0."""
        summed = np.bincount(keys, weights=np.reshape(weights, -1), minlength=self.runs * self.layers)
        return summed.reshape(self.runs, self.layers)

    def _put(self, metric: str, values: np.ndarray, where: np.ndarray) -> None:
        col = METRIC_INDEX[metric]
        self.table[..., col][where] = values[where]
        self.present[..., col] |= where

    def add_deltas(self, runs: np.ndarray | int, lids: Sequence[int] | np.ndarray,
                   counts: np.ndarray, square_sums: np.ndarray) -> None:
        """``delta_rms = sqrt(sum((dL/d output)^2) / elements)`` over every call of the step.

        One entry per call (or micro-batch): its output's element count and the sum of
        squares of the error back-propagated to it; several calls of a layer (gradient
        accumulation, a reused module) pool into one RMS.
        """
        square_sums = np.asarray(square_sums, dtype=np.float64)
        keys = self._keys(runs, lids, square_sums.shape)
        count = self._sum(keys, np.broadcast_to(np.asarray(counts, dtype=np.float64), square_sums.shape))
        squares = self._sum(keys, square_sums)
        with np.errstate(invalid="ignore", divide="ignore"):
            self._put("delta_rms", np.sqrt(squares / count), count > 0)

    def add_moments(self, runs: np.ndarray | int, lids: Sequence[int] | np.ndarray, counts: np.ndarray,
                    sums: np.ndarray, square_sums: np.ndarray) -> None:
        """Output mean and population std, ``sqrt(max(E[x^2] - E[x]^2, 0))``, pooled over the calls."""
        sums = np.asarray(sums, dtype=np.float64)
        keys = self._keys(runs, lids, sums.shape)
        count = self._sum(keys, np.broadcast_to(np.asarray(counts, dtype=np.float64), sums.shape))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self._sum(keys, sums) / count
            std = np.sqrt(np.maximum(self._sum(keys, square_sums) / count - mean * mean, 0.0))
        self._put("output_mean", mean, count > 0)
        self._put("output_std", std, count > 0)

    def add_activations(self, runs: np.ndarray | int, lids: Sequence[int] | np.ndarray,
                        stats: np.ndarray) -> None:
        """Each layer's mean over its calls of :func:`activation_stat_rows`' columns.

        ``saturated_frac`` NaN means "not applicable" (an activation without flat tails),
        not a non-finite value: those cells stay empty.
        """
        keys = self._keys(runs, lids, (len(stats),))
        size = self.runs * self.layers
        if len(np.unique(keys)) == len(keys):  # one call per layer: its values are the means
            means = np.full((size, len(ACTIVATION_METRICS)), np.nan)
            means[keys] = stats
            where = np.zeros(size, dtype=bool)
            where[keys] = True
        else:
            calls = np.bincount(keys, minlength=size).astype(np.float64)
            where = calls > 0
            with np.errstate(invalid="ignore", divide="ignore"):
                means = np.stack([np.bincount(keys, weights=stats[:, k], minlength=size)
                                  for k in range(len(ACTIVATION_METRICS))], -1) / calls[:, None]
        table = self.table.reshape(size, -1)
        present = self.present.reshape(size, -1)
        table[:, _ACTIVATION_COLUMNS] = np.where(where[:, None], means, table[:, _ACTIVATION_COLUMNS])
        has = np.broadcast_to(where[:, None], means.shape).copy()
        has[:, _SATURATED_K] &= ~np.isnan(means[:, _SATURATED_K])  # NaN: not applicable
        present[:, _ACTIVATION_COLUMNS] |= has

    def add_params(self, layout: ParamLayout, grad: np.ndarray, has_grad: np.ndarray,
                   weight: np.ndarray | None = None, moved: np.ndarray | None = None,
                   before: np.ndarray | None = None) -> None:
        """``grad_norm``, ``weight_norm`` and ``update_ratio`` of each parameterised layer.

        ``grad`` and ``has_grad`` are ``(runs, parameters)``; ``weight``, ``moved`` and
        ``before`` ``(runs, chosen)``: a layer's norm is ``sqrt(sum of its parameters'
        squared norms)``, and ``update_ratio = ||w_after - w_before|| / ||w_before||``
        over the same block of elements (inf where ``||w_before|| = 0``). A layer none of
        whose parameters had a gradient gets none of the three.
        """
        keys = self._keys(np.arange(self.runs)[:, None], layout.lids, (self.runs, len(layout.lids)))
        layer_has = self._sum(keys, has_grad[:, layout.params].astype(np.float64)) > 0
        self._put("grad_norm", np.sqrt(self._sum(keys, grad[:, layout.params] ** 2)), layer_has)
        if weight is None:
            return
        self._put("weight_norm", np.sqrt(self._sum(keys, weight[:, layout.slots] ** 2)), layer_has)
        if moved is None or before is None:
            return
        moved_norm = np.sqrt(self._sum(keys, moved[:, layout.slots] ** 2))
        before_norm = np.sqrt(self._sum(keys, before[:, layout.slots] ** 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = moved_norm / np.where(before_norm != 0, before_norm, 1.0)
        self._put("update_ratio", np.where(before_norm != 0, ratio, np.inf), layer_has)

    def add_window(self, layout: ParamLayout, w_max: np.ndarray, w_min: np.ndarray) -> None:
        """``grad_norm_max`` / ``_min``: per layer, from its parameters' extremes over the window.

        ``(runs, parameters)`` arrays from :class:`Window`; a parameter that had no gradient
        in the window (max still -inf) adds nothing.
        """
        keys = self._keys(np.arange(self.runs)[:, None], layout.lids, (self.runs, len(layout.lids)))
        in_window = w_max != -math.inf  # NaN counts: the parameter had a (bad) gradient
        layer_in = self._sum(keys, in_window[:, layout.params].astype(np.float64)) > 0
        hi = np.where(in_window, w_max, 0.0)[:, layout.params]
        lo = np.where(np.isposinf(w_min), 0.0, w_min)[:, layout.params]
        self._put("grad_norm_max", np.sqrt(self._sum(keys, hi**2)), layer_in)
        self._put("grad_norm_min", np.sqrt(self._sum(keys, lo**2)), layer_in)

    def rows(self, run: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(layer ids, values, present)`` of the layers with a value (:meth:`RunStore.add_layer_array`)."""
        written = np.flatnonzero(self.present[run].any(axis=1))
        return written, self.table[run, written], self.present[run, written]

    def deltas(self, run: int = 0) -> dict[int, float]:
        """``delta_rms`` by layer id, of the layers that have one (what the alerts judge)."""
        col = METRIC_INDEX["delta_rms"]
        lids = np.flatnonzero(self.present[run, :, col])
        return {int(lid): float(self.table[run, lid, col]) for lid in lids}


# --- scalars -----------------------------------------------------------------------------------


def step_scalars(
    step: int,
    *,
    grad: np.ndarray | None = None,
    has_grad: np.ndarray | None = None,
    applied: Sequence[float] | None = None,
    window: np.ndarray | None = None,
    window_steps: int = 0,
    lr: float | None = None,
    wall_time: float,
) -> list[list[tuple[int, str, float | None]]]:
    """The global scalars of one logged step, one list per run, in the store's order.

    ``total_grad_norm = sqrt(sum_p ||g_p||^2)`` over the parameters that had a gradient
    (``torch.nn.utils.get_total_norm``'s 2-norm), ``nonfinite_grads`` the count of
    non-finite ones; ``clipped_grad_norm`` the norm the optimizer applied (``applied``,
    per run); from the :class:`Window` (``(runs, 3)`` :meth:`Window.totals`)
    ``total_grad_norm_max`` / ``_min``, ``nonfinite_grads_max`` and ``window_steps``;
    then ``lr`` and ``wall_time``. ``grad`` and ``has_grad`` are ``(runs, parameters)``.
    """
    runs = next((len(a) for a in (grad, applied, window) if a is not None), 1)
    out: list[list[tuple[int, str, float | None]]] = [[] for _ in range(runs)]
    if grad is not None:
        mask = np.ones(grad.shape, dtype=bool) if has_grad is None else has_grad
        for k in range(runs):
            present = grad[k][mask[k]]
            out[k].append((step, "total_grad_norm", float(np.sqrt(np.sum(present**2)))))
            out[k].append((step, "nonfinite_grads", float(np.sum(~np.isfinite(present)))))
    if applied is not None:
        for k in range(runs):
            out[k].append((step, "clipped_grad_norm", float(applied[k])))
    if window is not None:
        for k in range(runs):
            t_max, t_min, bad_max = (float(v) for v in window[k])
            out[k] += [
                (step, "total_grad_norm_max", t_max),
                (step, "total_grad_norm_min", t_min),
                (step, "nonfinite_grads_max", bad_max),
                (step, "window_steps", float(window_steps)),
            ]
    for rows in out:
        if lr is not None:
            rows.append((step, "lr", float(lr)))
        rows.append((step, "wall_time", wall_time))
    return out


# --- tracked weights and the run's config ------------------------------------------------------


def tracked_elements(layer_name: str, numel: int, param_index: int, count: int) -> tuple[int, list[int]]:
    """``(block start, positions in the block)`` of a layer's tracked weight elements.

    The elements lie inside the update-ratio block of the weight
    (:func:`gradwatch.stats.weight_block`), at fixed random positions
    (:func:`gradwatch.stats.tracked_positions`) seeded by the layer's name length and
    the weight's size: the same elements in every run of one architecture, so the
    seeds' "weights against epochs" compare across runs. Flat indices: ``start + p``.
    """
    start, length = weight_block(numel, param_index)
    return start, tracked_positions(length, count, seed=len(layer_name) * 7919 + numel)


def tracked_columns(index: dict[int, list[int]]) -> tuple[list[int], list[int]]:
    """``(layer ids, element indices)`` columns of the tracked values, from ``layer id -> elements``."""
    return ([lid for lid, elements in index.items() for _ in elements],
            [element for elements in index.values() for element in elements])


def gradwatch_config(every: Any, model: str, parameters: int, optimizer: str | None,
                     **more: Any) -> dict[str, Any]:
    """``config["gradwatch"]`` of a run: how it was recorded (cadence, model, size, optimizer)."""
    every_value = every if isinstance(every, int) else getattr(every, "__name__", "callable")
    return {"every": every_value, "model": model, "parameters": parameters, "optimizer": optimizer, **more}
