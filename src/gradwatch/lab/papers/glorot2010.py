"""``glorot2010``: Glorot & Bengio (2010), standard vs normalised initialisation.

The paper trains 5-hidden-layer MLPs (1,000 units each) with sigmoid, tanh and softsign
by plain SGD, with the "standard" init W ~ U[-1/sqrt(n), 1/sqrt(n)] (Var(W) = 1/(3 n),
eq. 1) or the "normalised" one, Var(W) = 2 / (n_in + n_out) (eq. 16, "N" in its Table 1),
on Shapeset-3x2 and MNIST, and argues from the variance of the back-propagated gradient:

* with the standard init each layer multiplies Var(dC/ds) by n Var(W) = 1/3 (eq. 13-14,
  linear regime), so it shrinks toward the input; with the normalised init it stays level;
* the variance of the weight gradient, Var(dC/dW^i) ~ Var(x^i) Var(dC/ds^i), stays roughly
  level across layers with both inits (the forward and backward shrinkages cancel, eq. 15).

Scaled down to minutes on two CPU cores: width 256 instead of 1,000, a fixed Shapeset-3x2
sample of 20,000 images (:mod:`gradwatch.lab.shapeset`; the paper draws an unlimited
stream) trained for a few epochs, and MNIST-1D (generated offline) in place of MNIST;
minibatch 32 instead of 10, one learning rate for all instead of one tuned per model.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from gradwatch.lab.data import BUILTIN_INPUT_SHAPES
from gradwatch.lab.models import ModelConfig, build_model, describe
from gradwatch.lab.presets import (
    Claim,
    ConfigSummary,
    Preset,
    Published,
    TrainSettings,
    Verdict,
    format_number,
    grid_entry,
    register_preset,
)
from gradwatch.store import RunStore

__all__ = [
    "PAPER",
    "DEPTH",
    "WIDTH",
    "TRAIN",
    "MODELS",
    "glorot2010_preset",
    "gradient_variances",
    "hidden_gradient_variances",
    "weight_counts",
    "per_layer_factor",
]

PAPER = ("Xavier Glorot and Yoshua Bengio (2010). Understanding the difficulty of training deep "
         "feedforward neural networks. AISTATS 2010, PMLR 9:249-256.")
DEPTH = 5
WIDTH = 256
# Plain SGD as in the paper (it uses minibatches of 10 and tunes the rate per model).
SHAPESET_TRAIN = TrainSettings(optimizer="sgd", lr=0.1, epochs=6, batch_size=32, every=50)
MNIST1D_TRAIN = TrainSettings(optimizer="sgd", lr=0.1, epochs=20, batch_size=32, every=50)
TRAIN = {"shapeset": SHAPESET_TRAIN, "mnist1d": MNIST1D_TRAIN}
# The paper's rows of Table 1: (name, activation, init).
MODELS = (
    ("sigmoid", "Sigmoid", "sigmoid", "standard"),
    ("tanh", "Tanh", "tanh", "standard"),
    ("tanh-n", "Tanh N", "tanh", "xavier"),
    ("softsign", "Softsign", "softsign", "standard"),
    ("softsign-n", "Softsign N", "softsign", "xavier"),
)
# Table 1, test error (%) after training: Shapeset-3x2 and MNIST.
PUBLISHED_ERROR = {
    "shapeset": {"sigmoid": 82.61, "tanh": 27.15, "tanh-n": 15.60, "softsign": 16.27, "softsign-n": 16.06},
    "mnist1d": {"sigmoid": 2.21, "tanh": 1.76, "tanh-n": 1.64, "softsign": 1.64, "softsign-n": 1.72},
}
_SOURCES = {"shapeset": "Table 1, Shapeset-3x2", "mnist1d": "Table 1, MNIST (ours: MNIST-1D)"}
# What decides "shrinks" and "level" for a per-layer variance factor (see per_layer_factor):
# the standard init's theory is 1/3 per layer, the normalised init's 1.
SHRINKS_BELOW = 0.5
LEVEL = (0.7, 1 / 0.7)


def _key(dataset: str, name: str) -> str:
    return f"{dataset}/{name}"


# --- measurements ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def weight_counts(config: ModelConfig, dataset: str) -> tuple[int, ...]:
    """Number of weights of each hidden Linear/Conv layer of ``config`` built for ``dataset``,
    input side first (the first layer's depends on the data set's input size).
    """
    shape = BUILTIN_INPUT_SHAPES.get(dataset)
    if shape is None:
        from gradwatch.lab.data import load_dataset

        shape = load_dataset(dataset).input_shape
    model = build_model(config, shape, 10)
    return tuple(block._modules[block.layer_name].weight.numel() for block in model.hidden)


def gradient_variances(metrics: pd.DataFrame, config: ModelConfig,
                       dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Per hidden layer (input side first), at the first step of ``metrics`` (a run's
    per-layer metrics, as ``RunStore.metrics`` returns them; initialisation in the lab):

    * the back-propagated gradient's variance, ``delta_rms^2 = mean((dC/ds)^2)`` of the
      layer's output s (the paper's Var[dC/ds^i]; its mean is ~0 at initialisation);
    * the weight gradient's variance, ``grad_norm^2 / n_weights = mean((dC/dW)^2)``
      (the paper's Var[dC/dW^i]).

    Raises:
        ValueError: no hidden layer in ``metrics``, or not as many as the model has.
    """
    m = metrics[(metrics["kind"] == "param") & metrics["layer"].str.startswith("hidden.")
                & ~metrics["type"].str.contains("Norm")]
    if m.empty:
        raise ValueError("no hidden layer in the metrics")
    first = m[m["step"] == m["step"].min()].sort_values("layer_id")
    counts = np.asarray(weight_counts(config, dataset), dtype=float)
    if len(counts) != len(first):
        raise ValueError(f"{len(first)} hidden layers recorded, the model has {len(counts)}")
    delta_var = first["delta_rms"].to_numpy(float) ** 2
    weight_var = first["grad_norm"].to_numpy(float) ** 2 / counts
    return delta_var, weight_var


def hidden_gradient_variances(store: RunStore, run_id: int, config: ModelConfig,
                              dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gradient_variances` of a run in ``store`` at its first logged step."""
    head = store.metrics(run_id, metrics=["delta_rms", "grad_norm"], steps=(0, 0))
    if head.empty:  # a run that did not log step 0
        head = store.metrics(run_id, metrics=["delta_rms", "grad_norm"])
    try:
        return gradient_variances(head, config, dataset)
    except ValueError as err:
        raise ValueError(f"run {run_id}: {err}") from None


def per_layer_factor(variances: Sequence[float]) -> float:
    """How a variance changes per layer toward the input, from a least-squares fit.

    With v_i the variance at hidden layer i (i = 0 at the input), the fit
    ln v_i = a + b i gives ``exp(-b)``, the typical ratio v_i / v_{i+1} of a layer to the
    one above it: below 1 the variance shrinks toward the input by that factor per layer,
    1 is level. Glorot & Bengio's eq. 14 predicts n Var(W) for the back-propagated
    gradient in the linear regime: 1/3 with the standard init, 1 with the normalised one
    (equal widths). NaN with fewer than two positive finite values.
    """
    v = np.asarray(variances, dtype=float)
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() < 2:
        return math.nan
    i = np.arange(len(v))[ok]
    slope = np.polyfit(i, np.log(v[ok]), 1)[0]
    return float(math.exp(-slope))


def _factor_metric(which: int):
    def metric(summary: ConfigSummary, store: RunStore) -> tuple[float, ...]:
        entry = summary.entry
        return tuple(per_layer_factor(hidden_gradient_variances(store, rid, entry.model,
                                                                entry.dataset or "shapeset")[which])
                     for rid in summary.run_ids)
    metric.__doc__ = ("Per seed, at initialisation: the per-layer factor (:func:`per_layer_factor`) of the "
                      + ("back-propagated" if which == 0 else "weight") + " gradient's variance.")
    return metric


# --- claims --------------------------------------------------------------------------------


def _mean_pm(values: Sequence[float]) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "-"
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{format_number(statistics.fmean(vals))} ± {format_number(std)}"


def _error(s: ConfigSummary) -> float:
    return 100.0 * (1.0 - s.test_acc_mean)


def _sigmoid_worst(datasets: Sequence[str]):
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        parts, held = [], True
        for ds in datasets:
            errors = {name: _error(summaries[_key(ds, name)]) for name, *_ in MODELS}
            worst = max(errors, key=errors.get)
            held &= worst == "sigmoid"
            listing = ", ".join(f"{label} {errors[name]:.1f}%" for name, label, *_ in MODELS)
            parts.append(f"{ds}: {listing} (worst: {worst})")
        return Verdict(held, "test error; " + "; ".join(parts))
    return check


def _normalised_helps(activation: str, datasets: Sequence[str]):
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        parts, held = [], True
        for ds in datasets:
            std, norm = summaries[_key(ds, activation)], summaries[_key(ds, f"{activation}-n")]
            errs = [100 * (1 - a) for a in std.test_acc], [100 * (1 - a) for a in norm.test_acc]
            better = _error(norm) < _error(std)
            held &= better
            parts.append(f"{ds}: standard {_mean_pm(errs[0])}% -> normalised {_mean_pm(errs[1])}% "
                         f"({'lower' if better else 'NOT lower'})")
        return Verdict(held, "test error; " + "; ".join(parts))
    return check


def _variance_claim(activation: str, datasets: Sequence[str]):
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        parts, held = [], True
        for ds in datasets:
            for name, init_name in ((activation, "standard"), (f"{activation}-n", "normalised")):
                s = summaries[_key(ds, name)]
                backprop = _factor_metric(0)(s, store)
                weights = _factor_metric(1)(s, store)
                b, w = statistics.fmean(backprop), statistics.fmean(weights)
                level_w = LEVEL[0] <= w <= LEVEL[1]
                ok_b = b <= SHRINKS_BELOW if init_name == "standard" else LEVEL[0] <= b <= LEVEL[1]
                held &= ok_b and level_w
                expected = "shrinking" if init_name == "standard" else "level"
                parts.append(f"{ds} {init_name}: back-propagated {_mean_pm(backprop)} per layer "
                             f"({expected if ok_b else 'NOT ' + expected}), "
                             f"weight gradient {_mean_pm(weights)} ({'level' if level_w else 'NOT level'})")
        return Verdict(held, f"{activation}, per-layer variance factor toward the input at initialisation "
                             f"(shrinks: <= {SHRINKS_BELOW}; level: within [{LEVEL[0]:.2f}, "
                             f"{LEVEL[1]:.2f}]); " + "; ".join(parts))
    return check


# --- the preset ----------------------------------------------------------------------------


def glorot2010_preset(
    *,
    width: int = WIDTH,
    train: Mapping[str, TrainSettings] | None = None,
    datasets: Sequence[str] = ("shapeset", "mnist1d"),
    seeds: int = 3,
    name: str = "glorot2010",
) -> Preset:
    """The ``glorot2010`` preset (smaller ``width``/``train`` for tests).

    Args:
        width: units per hidden layer. Default: :data:`WIDTH`.
        train: data set -> training settings. Default: :data:`TRAIN`.
        datasets: which of ``"shapeset"`` and ``"mnist1d"`` to train on. Default: both.
        seeds: seeds per configuration. Default: 3.
        name: the preset's name. Default: ``"glorot2010"``.
    """
    settings = {**TRAIN, **(train or {})}
    grid, published = [], []
    for ds in datasets:
        for key, label, activation, init in MODELS:
            model = ModelConfig(depth=DEPTH, width=width, activation=activation, init=init)
            grid.append(grid_entry(ds, key, model, settings[ds], label=f"{label}: {describe(model)}",
                                   dataset=ds))
            published.append(Published(_key(ds, key), "test_error_pct", PUBLISHED_ERROR[ds][key], label,
                                       _SOURCES[ds]))
        for key, label in (("tanh", "Tanh"), ("tanh-n", "Tanh N")):
            theory = 1 / 3 if key == "tanh" else 1.0
            published.append(Published(_key(ds, key), "backprop_var_factor", theory,
                                       f"{label}: n Var(W) = {'1/3' if key == 'tanh' else '1'}",
                                       "eq. 13-14 (linear regime), back-propagated gradient"))
            published.append(Published(_key(ds, key), "weight_grad_var_factor", 1.0, f"{label}: level",
                                       "eq. 15 / Figure 8, weight gradient"))
    claims = (
        Claim("sigmoid has the highest test error of the five on each data set "
              "(Table 1: 82.61% on Shapeset, 2.21% on MNIST)", _sigmoid_worst(datasets)),
        Claim("the normalised init lowers tanh's test error on each data set "
              "(Table 1: 27.15% -> 15.60% on Shapeset, 1.76% -> 1.64% on MNIST)",
              _normalised_helps("tanh", datasets)),
        Claim("at initialisation the back-propagated gradient's variance shrinks toward the input with "
              "the standard init and stays level with the normalised init, while the weight gradient's "
              "variance stays roughly level with both (tanh; Figures 7-8, eq. 13-15)",
              _variance_claim("tanh", datasets)),
    )
    return Preset(
        name=name,
        description=("Glorot & Bengio 2010: 5-layer sigmoid/tanh/softsign MLPs, standard vs normalised "
                     f"init, on Shapeset-3x2 and MNIST-1D; scaled down: width {width} (paper 1,000), "
                     "20,000 Shapeset images for a few epochs (paper: an unlimited stream), MNIST-1D "
                     "for MNIST, SGD with one learning rate"),
        grid=tuple(grid),
        claims=claims,
        dataset=datasets[0],
        seeds=seeds,
        paper=PAPER,
        published=tuple(published),
        metrics={"backprop_var_factor": _factor_metric(0), "weight_grad_var_factor": _factor_metric(1)},
    )


register_preset(glorot2010_preset())
