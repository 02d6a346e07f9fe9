"""The ``ioffe2015`` preset: batch normalisation (Ioffe & Szegedy 2015).

The paper's Figure 1 trains a 3-hidden-layer MLP of 100 sigmoid units each on MNIST,
weights drawn as small Gaussians, with and without batch normalisation (mini-batches of
60): (a) the batch-normalised net reaches a higher test accuracy, faster; (b, c) the
15th, 50th and 85th percentiles of a last-layer sigmoid's inputs drift over training
without BN and stay put with it, inside the region where the sigmoid's derivative is not
small (the seeds' "green region", |x| <= 1.76). Its ImageNet table (Figure 3) gives the
steps each Inception variant needs to reach the plain network's best accuracy (72.2%):
31.0e6 without BN, 13.3e6 with BN at the same learning rate (BN-Baseline), 2.1e6 with BN
and a 5x learning rate (BN-x5), 2.7e6 at 30x (BN-x30).

Ours, scaled down to a few minutes on two cores: the same MLP on scikit-learn's 8x8
digits (the offline stand-in for MNIST: 1,437 training images), weights N(0, 1/fan_in)
(``init="scaled"``), plain SGD with mini-batches of 60 for 60 epochs (1,440 steps), at
learning rates 0.1 (no BN, BN) and 0.5 (BN-x5, and no BN at 0.5 as a control the paper
does not have). Test accuracy is measured at the end of each epoch (every 24 steps), so
step counts are whole epochs.

Metrics (one value per seed): ``best_test_error_pct``, 100 * (1 - best test accuracy over
the epochs), as the paper's "max accuracy"; and ``steps_to_match``, the steps a
configuration needs to first reach the no-BN net's best test accuracy *of the same seed*,
divided by the steps the no-BN net needed for it (1 for the no-BN net itself; NaN when
never reached), as the paper's 13.3e6 / 31.0e6 = 0.43.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from gradwatch.lab.models import ModelConfig
from gradwatch.lab.presets import (
    Claim,
    ClaimCheck,
    ConfigSummary,
    GridEntry,
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
    "BASELINE_KEY",
    "BN_KEY",
    "BN_X5_KEY",
    "NOBN_X5_KEY",
    "IOFFE_TRAIN",
    "GREEN_MIN",
    "ioffe_preset",
    "best_test_error_pct",
    "steps_to_match",
    "epoch_accuracies",
    "percentile_drift",
]

PAPER = ("Sergey Ioffe and Christian Szegedy (2015). Batch Normalization: Accelerating Deep Network "
         "Training by Reducing Internal Covariate Shift. ICML 2015, PMLR 37:448-456; arXiv:1502.03167.")
BASELINE_KEY = "mnist-mlp/sigmoid-nobn"
BN_KEY = "mnist-mlp/sigmoid-bn"
BN_X5_KEY = "mnist-mlp/sigmoid-bn-x5"
NOBN_X5_KEY = "mnist-mlp/sigmoid-nobn-x5"
LR = 0.1
# Paper: mini-batches of 60, SGD. 60 epochs of digits = 1,440 steps; every=8 logs 180 steps.
IOFFE_TRAIN = TrainSettings(optimizer="sgd", lr=LR, epochs=60, batch_size=60, every=8)
GREEN_MIN = 0.8  # "stay in the green region": at least this share of the sigmoids' inputs
FASTER = 0.5  # "far fewer steps": at most half (the paper's BN-Baseline needs 0.43)
_INCEPTION_STEPS = 31.0e6


def _model(batch_norm: bool) -> ModelConfig:
    return ModelConfig(depth=3, width=100, activation="sigmoid", init="scaled", sigma_w2=1.0,
                       sigma_b2=0.0, batch_norm=batch_norm)


# --- reading the runs ----------------------------------------------------------------------------


def epoch_accuracies(store: RunStore, run_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, test_acc)`` at the end of each epoch; steps count the optimizer steps taken."""
    s = store.scalars(run_id, names=["test_acc"])
    if "test_acc" not in s:
        return np.array([]), np.array([])
    s = s.dropna(subset=["test_acc"])
    return s["step"].to_numpy(float) + 1.0, s["test_acc"].to_numpy(float)


def best_test_error_pct(summary: ConfigSummary, store: RunStore) -> tuple[float, ...]:
    """``metrics["best_test_error_pct"]``: 100 * (1 - the best end-of-epoch test accuracy), per seed."""
    out = []
    for run_id in summary.run_ids:
        _, acc = epoch_accuracies(store, run_id)
        out.append(100.0 * (1.0 - acc.max()) if len(acc) else math.nan)
    return tuple(out)


def _first_reach(steps: np.ndarray, acc: np.ndarray, target: float) -> float:
    hit = np.nonzero(acc >= target - 1e-9)[0]
    return float(steps[hit[0]]) if len(hit) else math.nan


def _sibling(store: RunStore, run_id: int, config_key: str) -> int | None:
    """The finished run of ``config_key`` with this run's preset, seed, data set and epochs
    (the latest, as a resume keeps the latest), or None.
    """
    runs = store.runs()
    mine = runs.loc[runs["id"] == run_id, "config"].iloc[0]
    lab = mine.get("lab", {})
    best = None
    for row in runs[runs["status"] == "finished"].itertuples():
        c = row.config
        other = c.get("lab", {}) if isinstance(c, dict) else {}
        if (other.get("preset") == lab.get("preset") and other.get("config_key") == config_key
                and other.get("seed") == lab.get("seed") and c.get("dataset") == mine.get("dataset")
                and c.get("train", {}).get("epochs") == mine.get("train", {}).get("epochs")):
            best = int(row.id)
    return best


def _match(store: RunStore, run_id: int) -> tuple[float, float, float, float]:
    """``(target, baseline steps, steps, ratio)``: the no-BN run of the same seed's best test
    accuracy, the steps it and this run took to first reach it, and their ratio.

    Raises:
        KeyError: no finished no-BN run of that seed.
    """
    base = _sibling(store, run_id, BASELINE_KEY)
    if base is None:
        raise KeyError(BASELINE_KEY)
    b_steps, b_acc = epoch_accuracies(store, base)
    steps, acc = epoch_accuracies(store, run_id)
    if not len(b_acc) or not len(acc):
        return math.nan, math.nan, math.nan, math.nan
    target = float(b_acc.max())
    n_base, n = _first_reach(b_steps, b_acc, target), _first_reach(steps, acc, target)
    return target, n_base, n, n / n_base


def steps_to_match(summary: ConfigSummary, store: RunStore) -> tuple[float, ...]:
    """``metrics["steps_to_match"]``: steps to first reach the same seed's no-BN best test
    accuracy, over the no-BN net's steps to it (NaN if never reached), per seed.
    """
    return tuple(_match(store, run_id)[3] for run_id in summary.run_ids)


def _sigmoid_rows(store: RunStore, run_id: int, metrics: Sequence[str]):
    m = store.metrics(run_id, metrics=list(metrics))
    return m[(m["kind"] == "activation") & m["layer"].str.startswith("hidden.")]


def percentile_drift(store: RunStore, run_id: int, layer: str | None = None) -> float:
    """How far the 15/50/85th percentiles of a sigmoid's inputs move over training:
    ``max over logged steps t and q in {15, 50, 85} of |q(t) - q(0)|`` (Figure 1 b, c).

    Args:
        store: the lab's store.
        run_id: the run.
        layer: the activation's name; default the last hidden one (the paper's "typical
            sigmoid in the last hidden layer").

    Raises:
        ValueError: the run recorded no input percentiles.
    """
    a = _sigmoid_rows(store, run_id, ["input_q15", "input_q50", "input_q85"])
    if a.empty:
        raise ValueError(f"run {run_id} recorded no hidden activations")
    name = layer or a.sort_values("layer_id")["layer"].iloc[-1]
    a = a[a["layer"] == name].sort_values("step")
    q = a[["input_q15", "input_q50", "input_q85"]].to_numpy(float)
    if not np.isfinite(q).all():
        raise ValueError(f"run {run_id}, {name}: input percentiles not recorded (NaN); they need "
                         "a gradwatch whose watcher records input_q15/q50/q85")
    return float(np.abs(q - q[0]).max())


# --- claims ----------------------------------------------------------------------------------


def _faster_claim(bn: str, bn_x5: str, limit: float) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        s, x5 = summaries[bn], summaries[bn_x5]
        parts, held = [], True
        for seed, run_id in zip(s.seeds, s.run_ids, strict=True):
            target, n_base, n, ratio = _match(store, run_id)
            ok = math.isfinite(ratio) and ratio <= limit
            held &= ok
            reached = f"{n:.0f}" if math.isfinite(n) else "never"
            parts.append(f"seed {seed}: no BN reaches its best {100 * target:.1f}% at step {n_base:.0f}, "
                         f"BN at {reached} (ratio {format_number(ratio)})")
        x5_ratios = steps_to_match(x5, store)
        return Verdict(held, "; ".join(parts) + f"; need <= {limit:g} in every seed (paper: 13.3e6 / "
                             f"31.0e6 = 0.43); BN at 5x lr: ratios "
                             + ", ".join(format_number(r) for r in x5_ratios) + " (paper BN-x5: 0.068)")
    return check


def _more_accurate_claim(base: str, bn: str) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        b = best_test_error_pct(summaries[base], store)
        n = best_test_error_pct(summaries[bn], store)
        mb, mn = statistics.fmean(b), statistics.fmean(n)
        return Verdict(mn <= mb, f"best test error: no BN {mb:.2f}% (seeds "
                                 + ", ".join(f"{v:.1f}" for v in b) + f"), BN {mn:.2f}% (seeds "
                                 + ", ".join(f"{v:.1f}" for v in n) + "); paper (ImageNet): 27.8% vs 27.3%")
    return check


def _green_claim(bn_keys: Sequence[str], base: str, minimum: float) -> ClaimCheck:
    """Every hidden sigmoid of every BN run keeps >= ``minimum`` of its inputs green at every logged step."""
    def lowest(key: str, summaries: Mapping[str, ConfigSummary], store: RunStore) -> tuple[float, float]:
        lows, finals = [], []
        for run_id in summaries[key].run_ids:
            a = _sigmoid_rows(store, run_id, ["green_frac"]).dropna(subset=["green_frac"])
            if a.empty:
                raise ValueError(f"run {run_id} recorded no green fraction")
            lows.append(float(a["green_frac"].min()))
            finals.append(float(a[a["step"] == a["step"].max()]["green_frac"].mean()))
        return min(lows), statistics.fmean(finals)

    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        parts, held = [], True
        for key in bn_keys:
            low, final = lowest(key, summaries, store)
            held &= low >= minimum
            parts.append(f"{summaries[key].label}: lowest {100 * low:.0f}%, at the end {100 * final:.0f}%")
        low, final = lowest(base, summaries, store)
        parts.append(f"without BN: lowest {100 * low:.0f}%, at the end {100 * final:.0f}%")
        return Verdict(held, "share of sigmoid inputs in the green region (|x| <= 1.76), over every "
                             "hidden layer, logged step and seed: " + "; ".join(parts)
                             + f"; need >= {100 * minimum:.0f}% with BN")
    return check


def _stable_claim(base: str, bn: str) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        b = [percentile_drift(store, r) for r in summaries[base].run_ids]
        n = [percentile_drift(store, r) for r in summaries[bn].run_ids]
        mb, mn = statistics.fmean(b), statistics.fmean(n)
        return Verdict(mn < mb, "largest move of the last hidden sigmoid's input percentiles "
                                f"(15/50/85th) from initialisation: without BN {mb:.2f} (seeds "
                                + ", ".join(f"{v:.2f}" for v in b) + f"), with BN {mn:.2f} (seeds "
                                + ", ".join(f"{v:.2f}" for v in n) + ")")
    return check


# --- the preset --------------------------------------------------------------------------------


def _entries(train: TrainSettings) -> tuple[GridEntry, ...]:
    fast = TrainSettings(**{**train.to_dict(), "lr": train.lr * 5})
    specs = (("sigmoid-nobn", False, train, "no BN"),
             ("sigmoid-bn", True, train, "BN"),
             ("sigmoid-bn-x5", True, fast, "BN"),
             ("sigmoid-nobn-x5", False, fast, "no BN"))
    return tuple(
        grid_entry("mnist-mlp", name, _model(bn), t, label=f"sigmoid 3x100, {role}, SGD lr {t.lr:g}")
        for name, bn, t, role in specs
    )


def ioffe_preset(train: TrainSettings = IOFFE_TRAIN, *, seeds: int = 3) -> Preset:
    """The ``ioffe2015`` preset (a shorter ``train`` for tests)."""
    grid = _entries(train)

    def steps(x: float) -> float:
        return x / _INCEPTION_STEPS

    published = (
        Published(BASELINE_KEY, "best_test_error_pct", 27.8, "Inception (max accuracy 72.2%)",
                  "Figure 3, ImageNet top-1"),
        Published(BN_KEY, "best_test_error_pct", 27.3, "BN-Baseline (72.7%)", "Figure 3, ImageNet top-1"),
        Published(BN_X5_KEY, "best_test_error_pct", 27.0, "BN-x5 (73.0%)", "Figure 3, ImageNet top-1"),
        Published(None, "best_test_error_pct", 25.2, "BN-x30 (74.8%)", "Figure 3, ImageNet top-1"),
        Published(None, "best_test_error_pct", 30.2, "BN-x5-Sigmoid (69.8%)", "Figure 3, ImageNet top-1"),
        Published(BASELINE_KEY, "steps_to_match", 1.0, "Inception (31.0e6 steps to 72.2%)", "Figure 3"),
        Published(BN_KEY, "steps_to_match", steps(13.3e6), "BN-Baseline (13.3e6 steps)", "Figure 3"),
        Published(BN_X5_KEY, "steps_to_match", steps(2.1e6), "BN-x5 (2.1e6 steps)", "Figure 3"),
        Published(None, "steps_to_match", steps(2.7e6), "BN-x30 (2.7e6 steps)", "Figure 3"),
    )
    claims = (
        Claim(f"with BN the sigmoid MLP reaches the no-BN net's best test accuracy in far fewer steps "
              f"(at most {FASTER:g} of them, same learning rate)", _faster_claim(BN_KEY, BN_X5_KEY, FASTER)),
        Claim("with BN the best test accuracy is at least as high as without",
              _more_accurate_claim(BASELINE_KEY, BN_KEY)),
        Claim(f"with BN the sigmoids' inputs stay in the green region: >= {100 * GREEN_MIN:.0f}% of them "
              "at every logged step, in every hidden layer", _green_claim((BN_KEY, BN_X5_KEY), BASELINE_KEY,
                                                                          GREEN_MIN)),
        Claim("with BN the distribution of a last-layer sigmoid's inputs is more stable over training "
              "(Figure 1 b, c): its 15/50/85th percentiles move less than without BN",
              _stable_claim(BASELINE_KEY, BN_KEY)),
    )
    return Preset(
        name="ioffe2015",
        description=(f"sigmoid MLP 3x100 with vs without batch norm (Ioffe & Szegedy 2015, Figure 1), "
                     f"on digits instead of MNIST, SGD batch 60, {train.epochs} epochs at lr {train.lr:g} "
                     f"and {5 * train.lr:g}; about 3 minutes on 2 cores"),
        grid=grid,
        claims=claims,
        dataset="digits",
        seeds=seeds,
        paper=PAPER,
        published=published,
        metrics={"best_test_error_pct": best_test_error_pct, "steps_to_match": steps_to_match},
    )


register_preset(ioffe_preset())
