"""``he2015``: He, Zhang, Ren & Sun (2015), Xavier vs He initialisation of deep ReLU nets.

With Var(W) = 1/n (Xavier's, for equal fan-in and fan-out), each ReLU layer halves the
signal's second moment, E[y_l^2] = n Var(W) E[x_l^2] = (1/2) E[y_{l-1}^2] (their eq. 7-10),
so through L layers its RMS shrinks by 2^(-L/2); He init, Var(W) = 2/n, keeps it level. In
the paper (Figures 2-3) a 22-layer ReLU net trains with both inits, He's sooner, and a
30-layer one trains with He init while Xavier's "completely stalls".

Scaled down to minutes on two CPU cores: MLPs (not conv nets) of :data:`WIDTH` units on
scikit-learn's digits (offline) instead of ImageNet, the paper's SGD (minibatch 128,
learning rate 0.01, momentum 0.9) for 100 epochs, without its weight decay and
learning-rate schedule. A net "trains" when its test accuracy reaches
:data:`TRAINED_ACC` at some epoch (:func:`epochs_to_accuracy`).

The signal is measured at initialisation (step 0) as the RMS of each hidden Linear
layer's output (``sqrt(output_mean^2 + output_std^2)``): from the first hidden layer to
the last there are L - 1 ReLU layers, so Xavier's ratio should be 2^(-(L-1)/2).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from gradwatch.lab.models import ModelConfig, describe
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
    "DEPTHS",
    "WIDTH",
    "TRAIN",
    "TRAINED_ACC",
    "he2015_preset",
    "signal_ratio",
    "epochs_to_accuracy",
]

PAPER = ("Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2015). Delving deep into rectifiers: "
         "surpassing human-level performance on ImageNet classification. ICCV 2015, pp. 1026-1034.")
DEPTHS = (22, 30)
WIDTH = 128
DATASET = "digits"
# The paper's SGD: minibatch 128, learning rate 0.01, momentum 0.9 (no weight decay, no
# learning-rate schedule here); 100 epochs of digits' 1,437 training images = 1,200 steps.
TRAIN = TrainSettings(optimizer="sgd", lr=0.01, momentum=0.9, epochs=100, batch_size=128, every=10)
TRAINED_ACC = 0.5  # "trains": reaches 50% test accuracy (10 classes: chance 10%) within the budget
SLOWER = 2.0  # "much slower": at least twice the epochs to reach TRAINED_ACC
# Tolerance on the exponent of 2^(-(L-1)/2): within 15% of (L-1)/2 halvings of the RMS.
EXPONENT_TOLERANCE = 0.15


def _key(init: str, depth: int) -> str:
    return f"depth{depth}/{init}"


# --- measurements ------------------------------------------------------------------------------


def signal_ratio(store: RunStore, run_id: int) -> float:
    """RMS of the last hidden Linear layer's output over the first's, at the first logged
    step (initialisation): sqrt(mean^2 + std^2) of each layer's output over the batch.

    Raises:
        ValueError: the run recorded fewer than two hidden layers at its first step.
    """
    m = store.metrics(run_id, metrics=["output_mean", "output_std"])
    m = m[(m["kind"] == "param") & m["layer"].str.startswith("hidden.") & ~m["type"].str.contains("Norm")]
    first = m[m["step"] == m["step"].min()].sort_values("layer_id")
    if len(first) < 2:
        raise ValueError(f"run {run_id} recorded {len(first)} hidden layer(s); need two to compare")
    rms = np.sqrt(first["output_mean"].to_numpy(float) ** 2 + first["output_std"].to_numpy(float) ** 2)
    return float(rms[-1] / rms[0])


def epochs_to_accuracy(store: RunStore, run_id: int, target: float) -> float:
    """The first epoch (1-based) whose test accuracy reaches ``target``; inf if none did."""
    s = store.scalars(run_id, names=["epoch", "test_acc"]).dropna(subset=["test_acc"])
    reached = s[s["test_acc"] >= target]
    return float(reached["epoch"].iloc[0]) if len(reached) else math.inf


def _signal_metric(summary: ConfigSummary, store: RunStore) -> tuple[float, ...]:
    """Per seed: :func:`signal_ratio` at initialisation."""
    return tuple(signal_ratio(store, rid) for rid in summary.run_ids)


def _epochs_metric(summary: ConfigSummary, store: RunStore) -> tuple[float, ...]:
    """Per seed: :func:`epochs_to_accuracy` of :data:`TRAINED_ACC` (inf: never)."""
    return tuple(epochs_to_accuracy(store, rid, TRAINED_ACC) for rid in summary.run_ids)


# --- claims --------------------------------------------------------------------------------


def _epochs_text(epochs: Sequence[float]) -> str:
    return "/".join("never" if math.isinf(e) else f"{e:.0f}" for e in epochs)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _acc(s: ConfigSummary) -> str:
    return f"{100 * s.test_acc_mean:.0f}% ± {100 * s.test_acc_std:.0f}"


def _he_trains_xavier_stalls(depth: int, epochs: int):
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        he, xavier = summaries[_key("he", depth)], summaries[_key("xavier", depth)]
        he_epochs, xavier_epochs = _epochs_metric(he, store), _epochs_metric(xavier, store)
        m_he, m_x = _median(he_epochs), _median(xavier_epochs)
        he_trains = math.isfinite(m_he)
        slower = math.isinf(m_x) or m_x >= SLOWER * m_he
        target = f"{TRAINED_ACC:.0%}"
        return Verdict(he_trains and slower,
                       f"depth {depth}, {epochs} epochs: He reaches {target} test accuracy at epoch "
                       f"{_epochs_text(he_epochs)} (seeds), final {_acc(he)}; Xavier at epoch "
                       f"{_epochs_text(xavier_epochs)}, final {_acc(xavier)}; need He to reach it (median) "
                       f"and Xavier never or after >= {SLOWER:g}x He's epochs")
    return check


def _both_train_he_first(depth: int, epochs: int):
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        he, xavier = summaries[_key("he", depth)], summaries[_key("xavier", depth)]
        he_epochs, xavier_epochs = _epochs_metric(he, store), _epochs_metric(xavier, store)
        m_he, m_x = _median(he_epochs), _median(xavier_epochs)
        held = math.isfinite(m_he) and math.isfinite(m_x) and m_he <= m_x
        return Verdict(held, f"depth {depth}, {epochs} epochs: epochs to {TRAINED_ACC:.0%} test accuracy, "
                             f"He {_epochs_text(he_epochs)}, Xavier {_epochs_text(xavier_epochs)} (seeds); "
                             f"final test accuracy He {_acc(he)}, Xavier {_acc(xavier)}; need both to reach "
                             f"it, He no later (median)")
    return check


def _signal_claim(depths: Sequence[int]):
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        parts, held = [], True
        for depth in depths:
            halvings = (depth - 1) / 2  # expected log2 of 1/ratio for Xavier
            tol = EXPONENT_TOLERANCE * halvings
            for init, expected in (("xavier", -halvings), ("he", 0.0)):
                ratios = _signal_metric(summaries[_key(init, depth)], store)
                exponent = statistics.fmean(math.log2(r) for r in ratios)
                ok = abs(exponent - expected) <= tol
                held &= ok
                parts.append(f"{init} depth {depth}: RMS last/first {format_number(2 ** exponent)} = "
                             f"2^{exponent:.1f} (expected 2^{expected:.1f}{'' if ok else ', OUTSIDE'})")
        return Verdict(held, "at initialisation, geometric mean over seeds; tolerance "
                             f"{EXPONENT_TOLERANCE:.0%} of (L-1)/2 on the exponent; " + "; ".join(parts))
    return check


# --- the preset ----------------------------------------------------------------------------


def he2015_preset(
    *,
    depths: Sequence[int] = DEPTHS,
    width: int = WIDTH,
    train: TrainSettings = TRAIN,
    dataset: str = DATASET,
    seeds: int = 3,
    name: str = "he2015",
) -> Preset:
    """The ``he2015`` preset: ReLU MLPs of ``depths`` with Xavier and He init.

    Claims: at the deepest depth He trains and Xavier stalls or is much slower; at the
    others (the paper's 22 layers) both train, He no later; Xavier shrinks the signal
    by 2^(-(L-1)/2) from the first to the last hidden layer, He keeps it level.
    Smaller arguments make the reduced versions the tests run.
    """
    grid, published = [], []
    for depth in depths:
        for init, label in (("xavier", "Xavier"), ("he", "He")):
            model = ModelConfig(depth=depth, width=width, activation="relu", init=init)
            grid.append(grid_entry(f"depth{depth}", init, model, train, label=f"{label}: {describe(model)}"))
            expected = 2 ** (-(depth - 1) / 2) if init == "xavier" else 1.0
            text = f"2^(-{depth - 1}/2)" if init == "xavier" else "1 (level)"
            published.append(Published(_key(init, depth), "signal_ratio", expected,
                                       f"{label}, {depth} layers: {text}",
                                       "Sec. 2.2, eq. 10: Xavier halves E[y^2] per ReLU layer"))
    deepest = max(depths)
    claims = [
        Claim(f"at {deepest} layers He init trains (reaches {TRAINED_ACC:.0%} test accuracy) and Xavier "
              f"stalls or is much slower (>= {SLOWER:g}x the epochs) (Figure 3)",
              _he_trains_xavier_stalls(deepest, train.epochs)),
    ]
    claims += [Claim(f"at {d} layers both inits train, He no later than Xavier (Figure 2)",
                     _both_train_he_first(d, train.epochs)) for d in depths if d != deepest]
    claims.append(Claim("at initialisation Xavier shrinks the signal by 2^(-1/2) per ReLU layer, "
                        "2^(-(L-1)/2) from the first hidden layer to the last; He keeps it level (eq. 10)",
                        _signal_claim(depths)))
    return Preset(
        name=name,
        description=(f"He et al. 2015: {'/'.join(map(str, depths))}-layer ReLU MLPs, Xavier vs He init; "
                     f"scaled down: MLPs of width {width}, {dataset} instead of ImageNet, the paper's SGD "
                     f"for {train.epochs} epochs"),
        grid=tuple(grid),
        claims=tuple(claims),
        dataset=dataset,
        seeds=seeds,
        paper=PAPER,
        published=tuple(published),
        metrics={"signal_ratio": _signal_metric, "epochs_to_50pct": _epochs_metric},
    )


register_preset(he2015_preset())
